"""This node's quarantine records in etcd: the one its failures count into (``P/quarantine/<node>``, or with
``--quarantine-scope cluster`` the root's ``<root>/.quarantine/<node>``: read, modify, write guarded by its revision),
and the cluster-wide one, which every job honours whatever its scope. Noticing when an operator lifts either. The
arithmetic is ``quarantine.py``'s.

Cluster records: a node is held out while either record says so. The cluster key is watched from the node's first
gate on (one read then, none per round). A garbled cluster record (an operator's typo, another version) is one
warning naming the key and holds nobody out; where this job counts into it, its next write replaces it.

Guarantees: the key is watched from the first use on (read, then watch), so the record used is always the one in
etcd: an operator who deletes or rewrites it while it holds the node out lets the node check itself again at once
(``lifted``). A write that loses to another writer re-reads and counts on what is there; a record that keeps
changing is a ``BadKeyData`` (another agent with this node id?), never a loop.

Imports ``config``, ``errors``, ``etcd.client``, ``schema/`` and ``coord/`` (``cas``, ``mirror``, ``quarantine``,
``txns``);
never ``node/`` or the agent.
"""

from __future__ import annotations

from typing import Callable

from . import cas, quarantine, txns
from ..config import QuarantinePolicy
from ..errors import BadKeyData, EtcdAuthError
from ..etcd.client import Etcd
from ..schema.keys import Keys
from ..schema.values import Quarantine
from .mirror import Mirror

MAX_TRIES = 5  # each lost compare is another writer of this node's record: a few mean a second agent


class QuarantineRecord:
    """The quarantine records of one node, as its agent counts and reads them."""

    def __init__(self, etcd: Etcd, keys: Keys, node: str, mirror: Mirror, watch: Callable[[str, str, object], None],
                 read: Callable[[str], None], log, scope: str = "job", found: dict | None = None):
        """``watch(name, key, got)`` reads the key (or takes ``got``, a read made already: (kvs, revision)) and
        watches it from then on under ``name`` (idempotent); ``read(key)`` reads it again. ``scope``: where this
        node's failures count (``--quarantine-scope``). ``found``: records read already (key -> (kvs, revision),
        ``txns.init_job`` reads the cluster record with the job), watched from that read on when first used."""
        self.etcd, self.mirror, self.node, self.log = etcd, mirror, node, log
        self.cluster_key = keys.cluster_quarantine(node)  # honoured by every job
        self.key = self.cluster_key if scope == "cluster" else keys.quarantine(node)  # where its failures count
        self.by = f"run {keys.run_id}"
        self._watch, self._read = watch, read
        self._held_by = None  # the KV that last held this node out (None: none did)
        self._garbled: set[tuple[str, int]] = set()  # (key, mod_revision) of bad records already warned of
        self.to_count: float | None = None  # when this node's last failure that counts happened, until counted
        self.began: Quarantine | None = None  # a quarantine this agent's write started, until its hook is run
        self._unreadable = False  # etcd refused this job's user the cluster record: it is not honoured
        self._found = found if found is not None else {}

    def count(self, policy: QuarantinePolicy, failed_at: float | None, wall: float) -> Quarantine | None:
        """The record, with the failure at ``failed_at`` added (one guarded txn) when given."""
        self._watch("quarantine", self.key, self._found.pop(self.key, None))

        def attempt():
            kv = self.mirror.get(self.key)
            current = self._valid(kv)
            if failed_at is not None:
                new = quarantine.record_failure(current, self.node, failed_at, policy, wall, self.by)
                res = txns.put_quarantine(self.etcd, self.key, kv, new)
                if not res.succeeded:
                    self._read(self.key)  # written by someone else since: count on what is there now
                    return cas.AGAIN
                self.mirror.absorb(res.ranges[0], res.revision)
                if quarantine.began(current, new, wall):
                    self.began = new
                kv, current = res.ranges[0][0], new
            self._held_by = kv if quarantine.quarantined(current, wall) else None
            return current
        return cas.swap(attempt, self.key, "count its failure", hint="is another agent using this node id?",
                        tries=MAX_TRIES)

    def holds(self, policy: QuarantinePolicy, wall: float) -> tuple[str, float]:
        """Why a record holds this node out now ("" when none does) and for how many more seconds, after counting
        the failure that is ``to_count`` (if any; only with ``--quarantine-after``)."""
        problem, wait = "", 0.0
        if policy.active:
            q = self.count(policy, self.to_count, wall)
            self.to_count = None
            problem = quarantine.quarantined(q, wall)
            wait = q.until - wall if problem else 0.0
        counted_there = policy.active and self.key == self.cluster_key  # the cluster record was just read
        if not problem and not counted_there and not self._unreadable:
            try:
                self._watch("cluster_quarantine", self.cluster_key, self._found.pop(self.cluster_key, None))
            except EtcdAuthError as exc:  # a per-job user made before cluster records: the job runs without them
                self._unreadable = True
                self.log.warning("cannot read %s (%s): cluster-wide quarantines do not hold this node out; grant the "
                                 "job's user read access to it (deploy/etcd-job-user.sh does)", self.cluster_key, exc)
                return problem, wait
            kv = self.mirror.get(self.cluster_key)
            q = self._valid(kv)
            problem = quarantine.quarantined(q, wall)
            if problem:
                self._held_by, wait = kv, q.until - wall
                problem = f"{problem} (cluster-wide)"
        return problem, wait

    def _valid(self, kv) -> Quarantine | None:
        """The record in ``kv`` (None: absent). A garbled cluster record is None too, after a warning naming the key
        (once per version); a garbled job record raises BadKeyData, which holds the agent until it is repaired, as
        any bad value of the job does."""
        if kv is None:
            return None
        try:
            return self.mirror.record(kv, Quarantine)
        except BadKeyData as exc:
            if kv.key != self.cluster_key:
                raise
            if (kv.key, kv.mod_revision) not in self._garbled:
                self._garbled.add((kv.key, kv.mod_revision))
                self.log.warning("ignoring a quarantine record that is not valid: %s; it does not hold this node "
                                 "out (an operator may delete it: etcd-agent quarantine release %s)", exc,
                                 self.node)
            return None

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
