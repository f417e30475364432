"""Deleting the stray keys that would block a restart: keys under a round's exits that are no member's exit (a node
outside the plan's, planted by hand or left by a job of another prefix; junk below the exits such as
``exit/a/b``). A restart requires the round to have no key under its exits, so every restart's guard would fail
while one is there.

Guarantees: each key is deleted only if it is still the version read (one txn, at most ``txns.MAX_STRAYS`` keys; more
go on the next restart), and each is warned about once (``strays.Strays``). A non-leader knows the round's exits only
after a failed compare re-read them. Imports ``etcd.client``, ``schema.values`` and ``coord/`` (``mirror``,
``strays``, ``txns``) only.
"""

from __future__ import annotations

from . import txns
from ..etcd.client import Etcd, prefix_end
from ..schema.values import Plan
from .mirror import Mirror
from .strays import Strays


def drop_ghost_exits(etcd: Etcd, strays: Strays, mirror: Mirror, plan: Plan | None) -> None:
    """Delete the keys under ``plan``'s round's exits that are no member's exit, as far as the mirror holds them.
    A member holding only its part of the plan cannot tell whose exit a key is: with keys there, it reads the whole
    plan first (rare: a non-leader holds the exits only after a failed compare re-read them)."""
    if plan is not None and not plan.complete and mirror.under(mirror.keys.exits(plan.round)):
        start = mirror.keys.plan(plan.round)
        kvs, rev = etcd.get_prefix(start)
        mirror.reset_range(start, prefix_end(start), kvs, rev)
        plan = mirror.plan(plan.round)
    ghosts = strays.ghost_exits(plan) if plan is not None else []
    if ghosts:
        res = txns.delete_strays(etcd, ghosts)
        if res.succeeded:
            for kv in ghosts[:txns.MAX_STRAYS]:
                mirror.forget(kv.key, res.revision)
