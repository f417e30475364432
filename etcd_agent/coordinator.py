"""The coordination layer: one object that owns an agent's etcd client, its session, its watch, its mirror of the
job and the execution of guarded txns. The agent (``agent.py``) is a state machine over this object and its
worker group; a torchrun rendezvous handler can be one too. There is no second copy of the protocol.

Invariants:

- ``open`` finds this agent's job of the run (the running one, or a new one when the run's last job ended), then
  opens a session, reads the job prefix and starts the watch from that read's revision + 1, so the mirror misses
  no change. Every watch delivery reaches the owner through ``sink(("watch", delivery))``: the owner applies it
  with ``apply`` on its own thread.
- A session is opened in one step with its registration (``new_session``): the leases of earlier sessions are
  revoked first, so a retried registration never meets its own ghost; a session that fails half-way is closed
  again, never left running.
- Each action is one guarded txn (``txns``); ``act`` returns its result. After a success the owner waits until
  the watch shows the txn's revision (``caught_up``) before deciding again; after a failed compare, or when the
  watch lags more than ``Timings.settle_timeout``, it re-reads (``resync``).
- Every timing comes from one ``Timings`` (``config.py``), whose relations were checked when it was made.

Imports ``config``, ``errors``, ``etcd``, ``keys``, ``rendezvous``, ``session``, ``state``, ``txns`` and ``watch``;
never the worker group.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

from . import txns
from .config import AgentConfig
from .errors import ConfigError, EtcdUnavailable
from .etcd import Etcd, TxnResult
from .keys import Keys, RunKeys
from .rendezvous import Bump, ClosePlan, End, JoinRound, WriteExit
from .session import Session
from .state import Mirror, View
from .watch import Resync, Watch

log = logging.getLogger("etcd_agent.coordinator")


class Coordinator:
    """One agent's hand on its job in etcd."""

    def __init__(self, cfg: AgentConfig, version: str, sink: Callable[[tuple], None], shutdown: threading.Event):
        self.cfg = cfg
        self.timings = cfg.timings
        self.version = version
        self.node = cfg.node_id
        self._sink = sink
        self.run_keys = RunKeys(cfg.root, cfg.run_id)
        self.keys: Keys | None = None  # this agent's job of the run, known once ``open`` found it
        self.mirror: Mirror | None = None
        self.session: Session | None = None
        self.watch: Watch | None = None
        self.joined_round = 0  # the round whose join key this agent wrote last
        # Retries stop as soon as the session is lost: the owner must get back to fencing.
        self.etcd = Etcd(cfg.etcd, shutdown, interrupt=lambda: self.session is not None and self.session.lost.is_set())

    # --- opening and closing ---------------------------------------------------------------------------------
    def open(self, on_lost: Callable[[Session, str], None]) -> None:
        """Find the job, open a session, read the prefix, start the watch. An unreachable etcd is a ConfigError
        naming the endpoints (nothing of the job has changed then)."""
        try:
            version = self.etcd.status()
            log.info("connected to etcd %s at %s", version, self.etcd.endpoints_text)
            self.keys = txns.init_job(self.etcd, self.run_keys, self.cfg.spec, time.time())
            self.mirror = Mirror(self.keys)
            self.new_session(on_lost)
            kvs, rev = self.etcd.get_prefix(self.keys.prefix)
        except EtcdUnavailable as exc:
            raise ConfigError(f"--etcd-endpoints {self.etcd.endpoints_text}: {exc}") from exc
        self.mirror.reset(kvs, rev)
        self.watch = Watch(self.etcd, self.keys.prefix, rev + 1, lambda d: self._sink(("watch", d)),
                           probe_interval=self.timings.watch_probe, name=f"watch-{self.node}").start()

    def new_session(self, on_lost: Callable[[Session, str], None], stale: list[int] | None = None) -> Session:
        """Grant a lease, revoke the ``stale`` leases of earlier sessions (so their keys are gone before this one
        registers), claim the node rank, register. If a step fails, the session is closed again: an unreachable
        etcd leaves its lease in ``stale`` for the next attempt to revoke; a refusal (duplicate node id or rank)
        revokes it at once."""
        stale = [] if stale is None else stale
        session = Session(self.etcd, self.timings.lease_ttl, lambda why: on_lost(session, why))
        self.session = session
        session.start(deadline=self.timings.join_timeout)
        try:
            while stale:  # etcd is reachable again: the old sessions' keys go first
                self.etcd.lease_revoke(stale[0], deadline=self.timings.lease_ttl)
                stale.pop(0)
            self._register(session)
        except EtcdUnavailable:
            session.close(revoke=False)
            stale.append(session.lease_id)
            raise
        except BaseException:
            session.close(revoke=True)
            raise
        return session

    def _register(self, session: Session) -> None:
        info = {"node": self.node, "host": socket.gethostname(), "addr": self.cfg.address,
                "pid": os.getpid(), "version": self.version, "nproc": self.cfg.workers.nproc,
                "lease": f"{session.lease_id:x}", "started": time.time()}
        if self.cfg.node_rank is not None:
            # Before registering: a node refused for its rank never shows up in the registry, so a running job
            # never scales up (or restarts) for it. Waits out a holder whose lease is ending.
            claim = {k: info[k] for k in ("node", "host", "pid", "lease")} | {"rank": self.cfg.node_rank}
            txns.claim_node_rank(self.etcd, self.keys, self.cfg.node_rank, claim, session.lease_id,
                                 wait=self.timings.holder_wait)
        txns.register(self.etcd, self.keys, self.node, info, session.lease_id)

    def close(self) -> None:
        """Stop the watch, revoke the lease (this node's keys vanish at once) unless it is lost, close the client."""
        if self.watch:
            self.watch.cancel()
        if self.session and not self.session.lost.is_set():
            self.session.close(revoke=True)
        self.etcd.close()

    # --- the mirror ------------------------------------------------------------------------------------------
    def apply(self, delivery) -> None:
        """A watch delivery into the mirror; an older re-list than what the mirror holds is no news."""
        if isinstance(delivery, Resync):
            if delivery.revision > self.mirror.revision:
                self.mirror.reset(delivery.kvs, delivery.revision)
        else:
            self.mirror.apply(delivery)

    def view(self) -> View:
        return self.mirror.view()

    def caught_up(self, revision: int) -> bool:
        return self.mirror.revision >= revision

    def resync(self) -> None:
        """Read the prefix again and take it when it is newer than the mirror."""
        kvs, rev = self.etcd.get_prefix(self.keys.prefix)
        if rev > self.mirror.revision:
            self.mirror.reset(kvs, rev)

    # --- guarded txns ----------------------------------------------------------------------------------------
    def act(self, action, view: View, join_info: Callable[[], dict], who: str) -> TxnResult:
        """One guarded txn for a rendezvous action; logs what it changed. ``join_info`` makes this node's join
        record (only a join needs it). A failed compare is no error: the caller resyncs and decides again."""
        node, wall = self.node, time.time()
        if isinstance(action, JoinRound):
            res = txns.join(self.etcd, self.keys, action, node, join_info(), self.session.lease_id,
                            self.joined_round)
            if res.succeeded:
                self.joined_round = action.round.number
                log.info("%s joined round %d", who, action.round.number)
        elif isinstance(action, ClosePlan):
            res = txns.close(self.etcd, self.keys, action, wall)
            if res.succeeded:
                log.info("%s closed round %d with %d node(s) (%d workers): %s", who, action.round.number,
                         len(action.plan.members), action.plan.world_size, ", ".join(action.plan.nodes))
        elif isinstance(action, Bump):
            rs = view.restarts
            res = txns.bump(self.etcd, self.keys, action, rs.used if rs else 0, rs.max if rs else 0,
                            rs.mod_revision if rs else 0, node, wall)
            if res.succeeded:
                counted = f"restart {rs.used + 1} of {rs.max}" if action.counted and rs else "not counted"
                log.warning("%s restarting the job: %s (%s)", who, action.reason, counted)
        elif isinstance(action, WriteExit):
            res = txns.write_exit(self.etcd, self.keys, action, node, wall)
        elif isinstance(action, End):
            res = txns.end(self.etcd, self.keys, action, node, wall)
        else:
            raise TypeError(f"{action!r} is not an etcd action")
        return res

    def report_failure(self, report: dict) -> None:
        """Write this node's failure report for its round unless one is there already (create-if-absent)."""
        if self.mirror.get(self.keys.failure(report["round"], self.node)) is None:
            txns.report_failure(self.etcd, self.keys, report["round"], self.node, report)
