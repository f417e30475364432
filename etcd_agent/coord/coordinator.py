"""The coordination layer: one object that owns an agent's etcd client, its session, its watch, its mirror of the
job and the execution of guarded txns. The agent (``agent.py``) is a state machine over this object and its
worker group; a torchrun rendezvous handler can be one too. There is no second copy of the protocol.

Invariants:

- ``open`` finds this agent's job of the run (the running one, or a new one when the run's last job ended), opens
  a session and starts the watch of the job-wide keys. ``maintain`` (before every decision) watches what this
  agent's role in the current round needs, each range read first and watched from that read's revision + 1, so
  no change is missed (see ``maintain`` for who watches what; ``watches.py``). Every watch delivery reaches the
  owner through ``sink(WatchDelivery)``: the owner applies it with ``apply`` on its own thread.
- A session is opened in one step with its registration (``new_session``): the leases of earlier sessions are
  revoked first, so a retried registration never meets its own ghost; a session that fails half-way is closed
  again, never left running.
- Each action is one guarded txn (``txns``), chosen by the action's type from one table; ``act`` returns its
  result. A successful txn reads back what it
  wrote, and the mirror takes that at once, so the next decision sees it without waiting for any watch; after a
  failed compare the owner re-reads what was compared (``resync``: a few keys and ranges in one txn, never the
  whole job).
- Every timing comes from one ``Timings`` (``config.py``), whose relations were checked when it was made.
- This node's training progress is put at a bounded rate by a thread of its own (``progress.Publisher``), when the
  owner hands in a reading of it and the node runs workers with progress files.
- This node's registry entry (``registry.py``), its quarantine record (``quarantine_record.py``), what it watches
  for its role (``roles.py``, ``watches.py``) and the deletion of stray exit keys (``janitor.py``) are done here,
  each in a module of its own; so are the etcd sides of a lost session (``drop_session``, ``rejoin``), of a key that
  cannot be read (``hold_for``) and of a full etcd (``refused``).

Imports the base modules, ``schema/``, ``etcd/`` (client, session, watch) and the rest of ``coord/``; never
``node/`` (the worker group, the health gate), the agent or anything above.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from typing import Callable

from .. import logs
from . import abandon, blame, janitor, txns
from ..config import NO_RESTART_LIMIT, TORCHRUN_NPROC, AgentConfig
from ..errors import AgentError, BadKeyData, ConfigError, EtcdNoSpace, EtcdUnavailable, JobFailed, SessionLost
from ..etcd.client import Etcd, TxnResult, op_get_range, prefix_end
from ..proctree import free_port
from ..schema.keys import Keys, RunKeys, cluster_quarantine
from .blame import Attribute, ReportLoss
from .decide import Bump, ClosePlan, End, JoinRound, WriteExit
from ..etcd.session import Session
from .mirror import Mirror, Scope, View
from .progress import Publisher, Sample
from .quarantine_record import QuarantineRecord
from .registry import Registration
from .roles import Roles
from .strays import Strays
from ..schema.values import Failure, Join
from .watches import WatchDelivery, Watches

log = logs.get("etcd_agent.coord.coordinator")
NOSPACE_RETRY = 2.0  # seconds between writes tried while etcd's NOSPACE alarm refuses them


class Coordinator:
    """One agent's hand on its job in etcd."""

    TXNS = (JoinRound, ClosePlan, Bump, WriteExit, End, ReportLoss)  # the actions ``act`` turns into a txn

    def __init__(self, cfg: AgentConfig, version: str, sink: Callable[[WatchDelivery], None],
                 shutdown: threading.Event, where: logs.Where | None = None,
                 progress: Callable[[], Sample | None] | None = None):
        """``progress``, when given, reads this node's training step (``progress.Sample``): it is published."""
        self.cfg = cfg
        self._progress = progress
        self.publisher: Publisher | None = None
        self.log = log.bound(where)
        self.timings = cfg.timings
        self.version = version
        self.node = cfg.node_id
        self._sink = sink
        self.run_keys = RunKeys(cfg.root, cfg.run_id)
        self.keys: Keys | None = None  # this agent's job of the run, known once ``open`` found it
        self.mirror: Mirror | None = None
        self.session: Session | None = None
        self.quarantine: QuarantineRecord | None = None  # this node's P/quarantine/<node>, once ``open`` found the job
        self.joined_round = 0  # the round whose join key this agent wrote last
        self.etcd_version = ""  # what etcd said it runs, once ``open`` asked
        self.said_restart = 0  # the round this agent began with a restart, its reason logged then
        # Its failure that restarted the job, until it is known whether it counts toward its quarantine (it may be a
        # lost node's): meanwhile it watches as a leader does.
        self.pending: Failure | None = None
        self._shutdown = shutdown
        self._stale: list[int] = []  # leases of lost sessions, revoked before the next one registers
        self._give_up = 0.0  # when a fenced agent stops trying to open a new session
        self._bad_key = ""  # the key whose bad value was last reported (report each once)
        self._no_space = False  # etcd's NOSPACE alarm refused this agent's last write
        self.watches: Watches | None = None  # every range this agent watches, on one stream, once ``open``
        self.roles: Roles | None = None  # what it watches for its role in the round (``roles.py``), once ``open``
        self.strays: Strays | None = None  # the keys nothing should hold that this agent met, once ``open``
        # Retries stop as soon as the session is lost: the owner must get back to fencing.
        self.etcd = Etcd(cfg.etcd, shutdown, interrupt=lambda: self.session is not None and self.session.lost.is_set())
        self.registry = Registration(cfg, version, self.etcd)
        self._acts = dict(zip(self.TXNS, (self._join, self._close, self._bump, self._write_exit, self._end,
                                          self._report_loss)))

    # --- opening and closing ---------------------------------------------------------------------------------
    def open(self, on_lost: Callable[[Session, str], None]) -> None:
        """Find the job, open a session and watch the job-wide keys from the read that found the job; etcd's version
        is asked only where it is logged. An unreachable etcd is a ConfigError naming the endpoints."""
        try:
            self.etcd_version = self.etcd.status() if self.log.logger.isEnabledFor(logging.INFO) else "(not asked)"
            self.log.debug("connected to etcd %s at %s over %s", self.etcd_version, self.etcd.endpoints_text,
                           self.cfg.etcd.describe())
            grace, found = max(abandon.ABANDONED_GRACE, 3 * self.timings.lease_ttl), {}  # found: reads to watch from
            self.keys = txns.init_job(self.etcd, self.run_keys, self.cfg.spec, time.time(),
                                      lambda keys, first: abandon.end_if_abandoned(self.etcd, keys, grace,
                                                                                   self.log.info, first),
                                      self.cfg.join_timeout, found, [cluster_quarantine(self.cfg.root, self.node)])
            self.mirror = Mirror(self.keys)
            self.strays = Strays(self.keys, self.mirror, self.log)
            self.watches = Watches(self.etcd, self.mirror, self.strays, self._sink, self.timings.watch_probe,
                                   f"watch-{self.node}", self._own)
            self.roles = Roles(self.etcd, self.keys, self.node, self.mirror, self.watches, self.strays)
            self.quarantine = QuarantineRecord(self.etcd, self.keys, self.node, self.mirror, lambda name, key, got:
                                               self.watches.ensure(name, key, b"", got), self.roles.read_key,
                                               self.log, self.cfg.quarantine.scope, found)
            self._give_up = time.monotonic() + self.cfg.join_timeout
            while True:  # a session lost while it starts (keepalives starved, an election) is no config error
                try:
                    self.new_session(on_lost, self._stale)
                    self.watches.ensure("control", *self.keys.control(), found.pop("control", None))
                    break
                except (EtcdUnavailable, SessionLost) as exc:  # SessionLost: the lease expired before it registered
                    lost = isinstance(exc, SessionLost) or self.session.lost.is_set()
                    if not lost or self._shutdown.is_set() or time.monotonic() > self._give_up:
                        raise
                    if self.session.lease_id not in self._stale:  # registered: its keys go with the next one
                        self.session.close(revoke=False)
                        self._stale.append(self.session.lease_id)
                    self.log.warning("the session was lost while the agent started, opening another: %s", exc)
        except EtcdNoSpace:
            raise  # etcd answered: its message says what the operator must do, not which endpoints to check
        except EtcdUnavailable as exc:
            raise ConfigError(f"--etcd-endpoints {self.etcd.endpoints_text}: {exc}") from exc
        except SessionLost as exc:
            raise JobFailed(f"{self.node} lost every etcd session it opened while it started, for "
                            f"{self.cfg.join_timeout:g} s (--join-timeout): {exc}") from exc

    def new_session(self, on_lost: Callable[[Session, str], None], stale: list[int] | None = None) -> Session:
        """Grant a lease, revoke the ``stale`` leases of earlier sessions (so their keys are gone before this one
        registers), claim the node rank, register. If a step fails, the session is closed again: an unreachable
        etcd leaves its lease in ``stale`` for the next attempt to revoke; a refusal (duplicate node id or rank)
        revokes it at once."""
        stale = [] if stale is None else stale
        self.session = session = Session(self.etcd, self.timings, lambda why: on_lost(session, why))
        session.start(deadline=self.timings.join_timeout)
        try:
            while stale:  # etcd is reachable again: the old sessions' keys go first
                self.etcd.lease_revoke(stale[0], deadline=self.timings.lease_ttl)
                stale.pop(0)
            self.registry.register(self.keys, session.lease_id, self.mirror, self.timings)
        except (EtcdUnavailable, SessionLost):  # its lease is revoked (a lost one: ended already) before the next
            session.close(revoke=False)
            stale.append(session.lease_id)
            raise
        except BaseException:
            session.close(revoke=True)
            raise
        return session

    def drop_session(self) -> None:
        """The session is lost: close it unrevoked (revoked before the next registers); ``rejoin`` tries anew."""
        self._stale.append(self.session.lease_id)
        self.session.close(revoke=False)
        self._give_up = time.monotonic() + self.cfg.join_timeout

    def rejoin(self, on_lost: Callable[[Session, str], None]) -> bool:
        """Try to open a new session (its registration revokes the stale leases first): False when etcd cannot be
        reached yet (said), JobFailed once --join-timeout passed or the agent is shutting down."""
        try:
            self.new_session(on_lost, self._stale)
        except EtcdNoSpace:
            raise  # no lease until etcd is repaired: the owner holds, however long that takes
        except EtcdUnavailable as exc:
            if self._shutdown.is_set() or time.monotonic() >= self._give_up:
                raise JobFailed(f"{self.node} lost its etcd session and could not open a new one within "
                                f"{self.cfg.join_timeout:g} s (--join-timeout): {exc}") from exc
            self.log.warning("cannot open a new session yet: %s", exc)
            return False
        return True

    def hold_for(self, exc: BadKeyData) -> bool:
        """A key's value cannot be read: say so once per key and watch it (``Watches.watch_bad``), so that its repair
        or deletion always arrives; True when the read found it changed already (decide again at once)."""
        if exc.key != self._bad_key:
            self.log.error("%s; leaving the workers as they are until the key is fixed", exc)
        self._bad_key = exc.key
        return self.watches.watch_bad(exc.key, self.keys.prefix, self.log)

    def readable(self) -> None:
        """A decision was made on a view that could be read: a key that held the agent is no longer watched."""
        if self._bad_key:
            self.watches.watch_bad(None, self.keys.prefix, self.log)
        self._bad_key = ""

    def refused(self, exc: EtcdNoSpace) -> None:
        """etcd is full and refuses writes until an operator repairs it: say once what it needs."""
        if not self._no_space:
            self.log.error("etcd refuses writes, so this node keeps its workers as they are and tries again every "
                           "%g s until it can write: %s", NOSPACE_RETRY, exc)
        self._no_space = True

    def set_health(self, problem: str, announce: bool = False) -> None:
        """Say in this node's registry entry why it is unhealthy ("" healthy again; ``registry.py``)."""
        self.registry.set_health(problem, self.session.lease_id, self.mirror, announce)

    def close(self, why: str = "") -> None:
        """Stop the watches, revoke the lease (this node's keys vanish at once) unless it is lost, close the
        client. ``why`` this agent leaves (``received SIGTERM``): when it is the last live agent of a job that has
        no result, it ends the job ``stopped`` with that reason (``abandon.end_if_last``)."""
        if self.watches is not None:
            self.watches.cancel()
        if self.publisher is not None:
            self.publisher.close()
        if self.session and not self.session.lost.is_set():
            self.session.close(revoke=True)
        if why and self.keys is not None and not self.mirror_has_result():
            try:
                abandon.end_if_last(self.etcd, self.keys, self.node, why, time.time())
            except AgentError as exc:  # etcd unreachable or refusing: the next agent or status ends the job
                self.log.warning("could not tell whether this node was the job's last (%s): if it was, the next "
                                 "agent of the run or etcd-agent status ends the job", exc)
        self.etcd.close()

    def mirror_has_result(self) -> bool:
        """Whether this agent has seen the job's result (then nothing is left to end)."""
        return self.mirror is not None and self.mirror.get(self.keys.result()) is not None

    # --- what this agent watches -----------------------------------------------------------------------------
    def _own(self, key: str) -> bool:
        """Keys the mirror keeps whatever it watches: this node's own and the plans (who ran, who runs)."""
        try:
            parsed = self.keys.parse(key)
        except BadKeyData:
            return False
        return parsed.node == self.node or parsed.kind in ("plan", "plan_part")

    def maintain(self) -> None:
        """Watch what this agent's role in the current round needs, before it decides (``roles.Roles``); start the
        progress publisher once this node runs workers with progress files (a simulation's stand-ins and
        torchrun's workers have none: they never have the publisher's thread)."""
        self.roles.maintain(self.session.lease_id, bool(self.registry.health), self.pending is not None)
        if self.publisher is None and self._progress is not None and self._progress() is not None:
            self.publisher = Publisher(self.etcd, self.keys.progress(self.node), self.node,
                                       lambda: self.session.lease_id if self.session else 0, self._progress)
            self.publisher.start()

    @property
    def scope(self) -> Scope:
        return self.roles.scope if self.roles is not None else Scope(False)

    # --- the mirror ------------------------------------------------------------------------------------------
    def apply(self, item: WatchDelivery) -> None:
        """A watch delivery into the mirror; a delivery of a watch stopped since is no news."""
        self.watches.apply(item)

    def view(self) -> View:
        """What decide() sees (the leader knows the joins through the round watch's revision: the close guard refuses
        a plan if a join key was written after it). A bad value raises BadKeyData (the agent holds until it is
        repaired) unless the job has ended: then the view is the result alone (``etcd-agent stop`` always works)."""
        try:
            return self.mirror.view(self.scope, self.watches.known.get("round") if self.scope.full else None)
        except BadKeyData:
            ended = self.mirror.ended(self.scope)
            if ended is None:
                raise
            return ended

    def resync(self) -> None:
        """After a failed compare: read again what the compares were about (the job-wide keys, this node's join key,
        the round's exits and failures; for the leader the registry and the round) in one txn, not the whole job."""
        k, m = self.keys, self.mirror
        r = m.round()
        n = r.number if r else 0
        ranges = [k.control()]
        if n:
            ranges += [(k.join(n, self.node), b""), (k.exits(n), prefix_end(k.exits(n))),
                       (k.failures(n), prefix_end(k.failures(n)))]
        ranges += [r for r in map(self.watches.watched, ("registry", "round", "peer")) if r is not None]
        res = self.etcd.txn([], [op_get_range(start, end) for start, end in ranges],
                            where="re-read after a failed compare")
        for (start, end), kvs in zip(ranges, res.ranges):
            m.reset_range(start, end, kvs, res.revision)
        known = self.watches.known
        for name in ("control", "registry", "round", "peer"):
            if self.watches.watched(name) is not None:
                known[name] = max(known.get(name, 0), res.revision)

    # --- guarded txns ----------------------------------------------------------------------------------------
    def act(self, action, view: View) -> TxnResult:
        """One guarded txn for a rendezvous action (one of ``TXNS``); logs what it changed. A failed compare is no
        error: the caller resyncs and decides again."""
        res = self._acts[type(action)](action, view)
        if self._no_space:  # a write was answered: if etcd refused writes before, say that the job goes on
            self._no_space = False
            self.log.info("etcd accepts writes again (its NOSPACE alarm was cleared); the job goes on")
        if res.succeeded:  # what the txn wrote, read back in it: the mirror has it before any watch shows it
            # a join's second read (the round's oldest joins) is not kept, only its leader's key (``take_leader``)
            for kvs in res.ranges[:1] if type(action) is JoinRound else res.ranges:
                self.mirror.absorb(kvs, res.revision)
        return res

    def _join(self, action: JoinRound, view: View) -> TxnResult:
        old, node = self.joined_round, self.node
        res = txns.join(self.etcd, self.keys, action, node, self._join_record(view), self.session.lease_id, old)
        if res.succeeded:
            n = self.joined_round = action.round.number
            if old and old != n:
                self.mirror.forget(self.keys.join(old, node), res.revision)
            self.roles.take_leader(n, res.ranges[1], res.revision)
            self.log.info("joined round %d (%s leads it)", n, self.roles.leaders.get(n, "nobody"), event="round_joined")
        return res

    def _join_record(self, view: View) -> Join:
        """This node's join record; ``prev_rank`` is its group rank in the newest earlier plan, if it was in it;
        ``node_rank``, ``master_addr`` and ``master_port`` are the static-rendezvous flags (null when not given)."""
        before = view.last_plan.member(self.node) if view.last_plan else None
        return Join(self.node, host=socket.gethostname(), addr=self.cfg.address, port=master_port(self.cfg.address),
                    nproc=self.cfg.workers.nproc, prev_rank=before.group_rank if before else None,
                    node_rank=self.cfg.node_rank, master_addr=self.cfg.master_addr,
                    master_port=self.cfg.master_port, time=time.time(), spare=self.cfg.spare)

    def _close(self, action: ClosePlan, view: View) -> TxnResult:
        res = txns.close(self.etcd, self.keys, action, time.time())
        if res.succeeded:
            torchrun = self.cfg.spec.nproc_per_node == TORCHRUN_NPROC
            workers = "" if torchrun else f" ({action.plan.world_size} workers)"
            self.log.info("closed round %d with %d node(s)%s: %s", action.round.number, len(action.plan.members),
                          workers, ", ".join(action.plan.nodes), event="round_closed")
        return res

    def _bump(self, action: Bump, view: View) -> TxnResult:
        janitor.drop_ghost_exits(self.etcd, self.strays, self.mirror, view.plan)
        rs = view.restarts
        res = txns.bump(self.etcd, self.keys, action, rs.used if rs else 0, rs.max if rs else 0,
                        rs.mod_revision if rs else 0, self.node, time.time())
        if res.succeeded:
            limit = f" of {rs.max}" if rs and rs.max < NO_RESTART_LIMIT else ", no job-wide limit"
            counted = f"restart {rs.used + 1}{limit}" if action.counted and rs else "not counted"
            self.log.warning("restarting the job (%s): %s", counted, action.reason, event="job_restarting")
            self.said_restart = action.round.number + 1  # the round's reason is said: the agent need not repeat it
            if action.counted and action.failure is not None and self.cfg.quarantine.active:
                # this node's failure moved the job on: it counts for its quarantine (peers whose workers failed
                # only because of it report theirs, but are not the cause) unless a lost node caused it (``blame``)
                self.pending = dataclasses.replace(action.failure, time=action.failure.time or time.time())
        return res

    def attribute(self, a: Attribute, view: View) -> None:
        """Whether this node's failure that restarted the job counts toward its quarantine is known now."""
        self.pending = None
        if a.counted:
            self.quarantine.to_count = a.failure.time
            return
        self.log.info("%s; this node's failure there does not count toward its quarantine",
                      blame.attribution((view.last_failures or {}).values()))

    def _write_exit(self, action: WriteExit, view: View) -> TxnResult:
        return txns.write_exit(self.etcd, self.keys, action, self.node, time.time())

    def _end(self, action: End, view: View) -> TxnResult:
        return txns.end(self.etcd, self.keys, action, self.node, time.time())

    def _report_loss(self, action: ReportLoss, view: View) -> TxnResult:
        """Write loss reports for the last plan's round; whatever the compare found is read back into the mirror (a
        report there already is not written over, and is not tried again)."""
        res = txns.report_loss(self.etcd, self.keys, action)
        for kvs in res.ranges:
            self.mirror.absorb(kvs, res.revision)
        if res.succeeded:
            reports = [*(view.last_failures or {}).values(), *action.reports]
            self.log.warning("%s; that failure and this loss are one restart, counted already",
                             blame.attribution(reports))
        return res

    def report_failure(self, report: Failure) -> None:
        """Write this node's failure report for its round unless one is there already (create-if-absent)."""
        if self.mirror.get(self.keys.failure(report.round, self.node)) is None:
            try:
                txns.report_failure(self.etcd, self.keys, report.round, self.node, report)
            except EtcdNoSpace as exc:  # a late report is not worth holding a stop (or the agent) for
                self.log.warning("could not record this node's failure report for round %d: %s", report.round, exc)


def master_port(host: str) -> int:
    """A port free on ``host`` now: the plan's MASTER_PORT if this node becomes group rank 0. An address this
    host cannot bind (behind NAT, say) falls back to any interface."""
    try:
        return free_port(host)
    except OSError:
        return free_port("0.0.0.0")
