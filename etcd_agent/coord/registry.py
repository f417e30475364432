"""This node's registry entry ``P/nodes/<node>``: written with each session (after its ``--node-rank`` claim), and
rewritten when its health verdict changes, so the leader and ``status`` see why it does not join. It carries the
node's topology path (``--topology``), from which the round's leader orders the plan (``ranks.rank_round``).

Guarantees: the entry is on the session's lease; a retried registration whose first attempt applied finds its own
entry, never a duplicate (``txns.register``). A node that has a health check to pass registers ``checking`` and
counts only once one passed; the first pass ends ``checking`` in the same write that clears its health. A rewrite
is guarded by the entry's revision as last written, and the mirror takes the entry as written at once.

Imports ``config``, ``etcd.client``, ``schema/`` and ``coord/`` (``mirror``, ``txns``); never ``node/`` or the agent.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time

from . import txns
from ..config import AgentConfig, Timings
from ..etcd.client import Etcd
from ..schema.keys import Keys
from ..schema.values import NodeInfo, RankClaim
from .mirror import Mirror


class Registration:
    """This node's entry in its job's registry."""

    def __init__(self, cfg: AgentConfig, version: str, etcd: Etcd):
        self.cfg, self.version, self.etcd = cfg, version, etcd
        self.node = cfg.node_id
        self.health = ""  # why this node failed its health check ("" healthy), kept in its registry entry
        self.checking = cfg.health.active  # no health check has passed yet: its registry entry says so
        self._kv = None  # this node's registry KV as last written

    def register(self, keys: Keys, lease: int, mirror: Mirror | None, timings: Timings) -> None:
        """Claim the node rank (when pinned), then write the entry on ``lease``."""
        info = NodeInfo(self.node, socket.gethostname(), self.cfg.address, os.getpid(), self.version,
                        self.cfg.workers.nproc, f"{lease:x}", time.time(), self.health, self.cfg.spare,
                        self.checking, topology=self.cfg.topology)
        if self.cfg.node_rank is not None:
            # Before registering: a node refused for its rank never shows up in the registry, so a running job
            # never scales up (or restarts) for it. Waits out a holder whose lease is ending.
            claim = RankClaim(info.node, self.cfg.node_rank, info.host, info.pid, info.lease)
            txns.claim_node_rank(self.etcd, keys, self.cfg.node_rank, claim, lease, wait=timings.holder_wait)
        res = txns.register(self.etcd, keys, self.node, info, lease)
        self._kv = res.ranges[0][0]
        if mirror is not None:
            mirror.absorb(res.ranges[0], res.revision)

    def set_health(self, problem: str, lease: int, mirror: Mirror, announce: bool = False) -> None:
        """Say in the entry why this node is unhealthy ("" healthy again); the first pass also ends ``checking``, in
        the same write. ``announce``: write the entry even when nothing changed (a scale-up passed this node over:
        the leader may scale up for it once more)."""
        checking = self.checking and bool(problem)
        if problem == self.health and checking == self.checking and not announce:
            return
        self.health, self.checking = problem, checking
        kv = self._kv
        info = dataclasses.replace(NodeInfo.from_kv(kv), health=problem, checking=checking)
        res = txns.update_registration(self.etcd, kv, info, lease)
        if res.succeeded:
            self._kv = res.ranges[0][0]
            mirror.absorb(res.ranges[0], res.revision)
