"""Jobs nobody runs any more end: a job none of whose agents is left is ended ``stopped``, so ``status`` never shows
a cancelled or killed job ``running`` for good, and the run id can start a new job.

Who ends it:
- **The last agent to leave** (``end_if_last``): an agent that exits while its job has no result (SIGTERM from
  ``scancel``, a time limit, ``systemctl stop``, an error) first revokes its lease, then reads the job's registry;
  when no live agent is registered any more it ends the job in one txn guarded by that read (no registration
  since) and by the job having no result. Agents that leave together each look after their own revoke, so whichever
  looks last finds the registry empty: etcd orders the revokes and the reads.
- **The next agent of the run, or ``status``** (``end_if_abandoned``), for a job whose agents died without leaving
  (SIGKILL, a whole allocation lost): its registry is empty. An empty registry is not enough on its own (a job's
  first agent registers just after creating it; a fenced agent is between two sessions), so the caller watches
  the registry for ``grace`` seconds; only when nobody registered in that time is the job ended, guarded by the
  registry read.

A registry entry without a lease (a key put by hand) is nobody's and does not keep a job alive. Imports ``coord.txns``,
``etcd/`` (client, watch), ``schema.keys`` and ``logs``.
"""

from __future__ import annotations

import os
import time

from .. import logs
from . import txns
from ..errors import EtcdUnavailable
from ..etcd.client import Etcd, unchanged_under
from ..schema.keys import Keys
from .runs import first_entries
from ..etcd.watch import Resync, wait_for

log = logs.get("etcd_agent.coord.abandon")

ABANDONED = "abandoned: "  # how the reason of a job ended for want of agents starts (status, the exporter)
ABANDONED_GRACE = 15.0  # seconds an empty registry must stay empty before a job counts as abandoned


def live_nodes(kvs) -> list[str]:
    """The registry entries (``P/nodes/`` as read) that a live agent holds: those on a lease."""
    return [kv.key.rsplit("/", 1)[-1] for kv in kvs if kv.lease]


def scheduler() -> str:
    """What launched this agent, for the reason a job ends with: ``Slurm job 123`` or ''."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"Slurm job {job}" if job else ""


def end_if_last(etcd: Etcd, keys: Keys, node: str, why: str, wall: float) -> bool:
    """After this agent left (its lease revoked): end the job ``stopped`` when no live agent of it is registered
    and it has no result. True when this call ended it."""
    rev = _nobody_registered(etcd, keys)
    if rev is None:
        return False  # the job goes on without this node
    where = f" ({scheduler()})" if scheduler() else ""
    reason = f"every node of the job left; the last, {node}, {why}{where}"
    ended = txns.close_job(etcd, keys, "stopped", reason, wall, guards=[unchanged_under(keys.nodes(), rev)])
    if ended:
        log.warning("no other node of job %s is registered: this node ended it (stopped: %s)", keys.run_id, reason)
    return ended


def end_if_abandoned(etcd: Etcd, keys: Keys, grace: float = ABANDONED_GRACE, say=log.info,
                     first: list | None = None) -> bool:
    """Job ``keys`` has no result: end it ``stopped`` (abandoned) when no live agent registers in it within
    ``grace`` seconds from now. True when this call ended it; False as soon as a live agent is registered.
    ``first``: the registry's oldest ``FIRST_ENTRIES`` entries, read already (None: read them here)."""
    rev = _nobody_registered(etcd, keys, first)
    if rev is None:
        return False
    say("no node of job %s is registered; waiting up to %.0f s for one before ending the job as abandoned",
        keys.run_id, grace)
    if _registers_within(etcd, keys, rev, grace):
        return False
    reason = (f"{ABANDONED}no node of the job was registered for {grace:.0f} s (its agents died or were killed "
              "without leaving)")
    ended = txns.close_job(etcd, keys, "stopped", reason, time.time(), guards=[unchanged_under(keys.nodes(), rev)])
    if ended:
        log.warning("job %s ended: %s", keys.run_id, reason)
    return ended


def _nobody_registered(etcd: Etcd, keys: Keys, first: list | None = None) -> int | None:
    """The revision of a read of job ``keys``' registry that found no live agent, or None when one is there. The
    usual case, a live job, costs one small read however large its registry is (every agent of a job that ends
    asks this as it leaves)."""
    if first is None:
        first = etcd.txn([], [first_entries(keys)], where=f"read {keys.nodes()}").ranges[0]
    if live_nodes(first):
        return None
    kvs, rev = etcd.get_prefix(keys.nodes())
    return None if live_nodes(kvs) else rev


def _registers_within(etcd: Etcd, keys: Keys, rev: int, grace: float) -> bool:
    """Whether a live agent registers in job ``keys`` within ``grace`` seconds (watched from ``rev`` + 1)."""
    def registered(batch) -> bool:
        return bool(live_nodes(batch.kvs if isinstance(batch, Resync) else
                               [ev.kv for ev in batch if ev.kind == "put"]))
    try:
        return wait_for(etcd, keys.nodes(), rev, grace, registered, name=f"abandoned-{keys.run_id}")
    except EtcdUnavailable:
        return True  # nothing is ended on what could not be watched
