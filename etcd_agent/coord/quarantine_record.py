"""This node's quarantine record in etcd, ``P/quarantine/<node>``: counting a failure into it (read, modify, write
guarded by its revision) and noticing when an operator lifts it. The arithmetic is ``quarantine.py``'s.

Guarantees: the key is watched from the first use on (read, then watch), so the record used is always the one in
etcd: an operator who deletes or rewrites it while it holds the node out lets the node check itself again at once
(``lifted``). A write that loses to another writer re-reads and counts on what is there; a record that keeps
changing is a ``BadKeyData`` (another agent with this node id?), never a loop.

Imports ``config``, ``errors``, ``etcd.client``, ``schema/`` and ``coord/`` (``mirror``, ``quarantine``, ``txns``);
never ``node/`` or the agent.
"""

from __future__ import annotations

from typing import Callable

from . import cas, quarantine, txns
from ..config import QuarantinePolicy
from ..etcd.client import Etcd
from ..schema.keys import Keys
from ..schema.values import Quarantine
from .mirror import Mirror

MAX_TRIES = 5  # each lost compare is another writer of this node's record: a few mean a second agent


class QuarantineRecord:
    """``P/quarantine/<node>`` of one node, as its agent counts and reads it."""

    def __init__(self, etcd: Etcd, keys: Keys, node: str, mirror: Mirror, watch: Callable[[str], None],
                 read: Callable[[str], None], log):
        """``watch(key)`` reads the key and watches it from then on (idempotent); ``read(key)`` reads it again."""
        self.etcd, self.mirror, self.node, self.log = etcd, mirror, node, log
        self.key = keys.quarantine(node)
        self._watch, self._read = watch, read
        self._held_by = None  # the KV that last held this node out (None: none did)
        self.to_count: float | None = None  # when this node's last failure that counts happened, until counted

    def count(self, policy: QuarantinePolicy, failed_at: float | None, wall: float) -> Quarantine | None:
        """The record, with the failure at ``failed_at`` added (one guarded txn) when given."""
        self._watch(self.key)

        def attempt():
            kv = self.mirror.get(self.key)
            current = self.mirror.record(kv, Quarantine) if kv else None
            if failed_at is not None:
                new = quarantine.record_failure(current, self.node, failed_at, policy, wall)
                res = txns.put_quarantine(self.etcd, self.key, kv, new)
                if not res.succeeded:
                    self._read(self.key)  # written by someone else since: count on what is there now
                    return cas.AGAIN
                self.mirror.absorb(res.ranges[0], res.revision)
                kv, current = res.ranges[0][0], new
            self._held_by = kv if quarantine.quarantined(current, wall) else None
            return current
        return cas.swap(attempt, self.key, "count its failure", hint="is another agent using this node id?",
                        tries=MAX_TRIES)

    def holds(self, policy: QuarantinePolicy, wall: float) -> tuple[str, float]:
        """Why the record holds this node out now ("" when it does not) and for how many more seconds, after
        counting the failure that is ``to_count`` (if any)."""
        q = self.count(policy, self.to_count, wall)
        self.to_count = None
        problem = quarantine.quarantined(q, wall)
        return problem, (q.until - wall if problem else 0.0)

    def lifted(self) -> bool:
        """Whether the record changed (an operator deleted or rewrote it) since it last held the node out: the node
        checks itself again now, not when that record's cooldown would have ended."""
        held = self._held_by
        if held is None:
            return False
        now = self.mirror.get(held.key)
        if now is not None and now.mod_revision == held.mod_revision:
            return False
        self._held_by = None
        self.log.info("%s was %s while it held this node out; checking again whether it may join", held.key,
                      "deleted" if now is None else "rewritten")
        return True
