"""The coordination layer: one object that owns an agent's etcd client, its session, its watch, its mirror of the
job and the execution of guarded txns. The agent (``agent.py``) is a state machine over this object and its
worker group; a torchrun rendezvous handler can be one too. There is no second copy of the protocol.

Invariants:

- ``open`` finds this agent's job of the run (the running one, or a new one when the run's last job ended), opens
  a session and starts the watch of the job-wide keys. ``maintain`` (before every decision) watches what this
  agent's role in the current round needs, each range read first and watched from that read's revision + 1, so
  no change is missed (see ``maintain`` for who watches what). Every watch delivery reaches the owner through
  ``sink(("watch", item))``: the owner applies it with ``apply`` on its own thread.
- A session is opened in one step with its registration (``new_session``): the leases of earlier sessions are
  revoked first, so a retried registration never meets its own ghost; a session that fails half-way is closed
  again, never left running.
- Each action is one guarded txn (``txns``); ``act`` returns its result. A successful txn reads back what it
  wrote, and the mirror takes that at once, so the next decision sees it without waiting for any watch; after a
  failed compare the owner re-reads what was compared (``resync``: a few keys and ranges in one txn, never the
  whole job).
- Every timing comes from one ``Timings`` (``config.py``), whose relations were checked when it was made.

Imports the base modules, ``schema/``, ``etcd/`` (client, session, watch) and the rest of ``coord/``; never
``node/`` (the worker group, the health gate), the agent or anything above.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from typing import Callable

from .. import logs
from . import abandon, blame, quarantine, txns
from ..config import NO_RESTART_LIMIT, TORCHRUN_NPROC, AgentConfig
from ..errors import AgentError, BadKeyData, ConfigError, EtcdNoSpace, EtcdUnavailable
from ..etcd.client import Etcd, TxnResult, op_get_range, prefix_end
from ..schema.keys import Keys, RunKeys
from .blame import ReportLoss
from .decide import Bump, ClosePlan, End, JoinRound, WriteExit
from ..etcd.session import Session
from .mirror import FINAL_PHASES, JOINING, Mirror, Scope, View
from .strays import Strays
from ..schema.values import Failure, Join, NodeInfo, Quarantine, RankClaim
from ..etcd.watch import Resync, WatchStream

MAX_QUARANTINE_TRIES = 5

log = logs.get("etcd_agent.coord.coordinator")


class Coordinator:
    """One agent's hand on its job in etcd."""

    def __init__(self, cfg: AgentConfig, version: str, sink: Callable[[tuple], None], shutdown: threading.Event,
                 where: logs.Where | None = None):
        self.cfg = cfg
        self.log = log.bound(where)
        self.timings = cfg.timings
        self.version = version
        self.node = cfg.node_id
        self._sink = sink
        self.run_keys = RunKeys(cfg.root, cfg.run_id)
        self.keys: Keys | None = None  # this agent's job of the run, known once ``open`` found it
        self.mirror: Mirror | None = None
        self.session: Session | None = None
        self.health = ""  # why this node failed its health check ("" healthy), kept in its registry entry
        self.checking = cfg.health.active  # no health check has passed yet: its registry entry says so
        self._registration = None  # this node's registry KV as last written
        self._held_by = None  # the KV of P/quarantine/<node> that last held this node out (None: none did)
        self.joined_round = 0  # the round whose join key this agent wrote last
        self.awaiting = False  # its failure restarted the job and may be a lost node's: it watches as a leader does
        self.scope = Scope(False)  # what the mirror covers, set by ``maintain``
        self.stream: WatchStream | None = None  # every range this agent watches, on one stream
        self._watches: dict[str, tuple[int, str, bytes]] = {}  # name -> (token of the stream's range, start, end)
        self._known: dict[str, int] = {}  # name -> revision through which that watch's range is known
        self._leaders: dict[int, str] = {}  # round -> its leader, as this agent's join txn (or a re-read) found
        self._round = 0
        self.strays: Strays | None = None  # the keys nothing should hold that this agent met, once ``open``
        # Retries stop as soon as the session is lost: the owner must get back to fencing.
        self.etcd = Etcd(cfg.etcd, shutdown, interrupt=lambda: self.session is not None and self.session.lost.is_set())

    # --- opening and closing ---------------------------------------------------------------------------------
    def open(self, on_lost: Callable[[Session, str], None]) -> None:
        """Find the job, open a session, read the job-wide keys and start their watch. An unreachable etcd is a
        ConfigError naming the endpoints (nothing of the job has changed then)."""
        try:
            version = self.etcd.status()
            self.log.info("connected to etcd %s at %s over %s", version, self.etcd.endpoints_text,
                          self.cfg.etcd.describe())
            grace = max(abandon.ABANDONED_GRACE, 3 * self.timings.lease_ttl)
            self.keys = txns.init_job(self.etcd, self.run_keys, self.cfg.spec, time.time(),
                                      lambda keys: abandon.end_if_abandoned(self.etcd, keys, grace, self.log.info))
            self.mirror = Mirror(self.keys)
            self.strays = Strays(self.keys, self.mirror, self.log)
            self.new_session(on_lost)
            self._ensure("control", *self.keys.control())
        except EtcdNoSpace:
            raise  # etcd answered: its message says what the operator must do, not which endpoints to check
        except EtcdUnavailable as exc:
            raise ConfigError(f"--etcd-endpoints {self.etcd.endpoints_text}: {exc}") from exc

    def new_session(self, on_lost: Callable[[Session, str], None], stale: list[int] | None = None) -> Session:
        """Grant a lease, revoke the ``stale`` leases of earlier sessions (so their keys are gone before this one
        registers), claim the node rank, register. If a step fails, the session is closed again: an unreachable
        etcd leaves its lease in ``stale`` for the next attempt to revoke; a refusal (duplicate node id or rank)
        revokes it at once."""
        stale = [] if stale is None else stale
        session = Session(self.etcd, self.timings, lambda why: on_lost(session, why))
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
        info = NodeInfo(self.node, socket.gethostname(), self.cfg.address, os.getpid(), self.version,
                        self.cfg.workers.nproc, f"{session.lease_id:x}", time.time(), self.health, self.cfg.spare,
                        self.checking)
        if self.cfg.node_rank is not None:
            # Before registering: a node refused for its rank never shows up in the registry, so a running job
            # never scales up (or restarts) for it. Waits out a holder whose lease is ending.
            claim = RankClaim(info.node, self.cfg.node_rank, info.host, info.pid, info.lease)
            txns.claim_node_rank(self.etcd, self.keys, self.cfg.node_rank, claim, session.lease_id,
                                 wait=self.timings.holder_wait)
        res = txns.register(self.etcd, self.keys, self.node, info, session.lease_id)
        self._registration = res.ranges[0][0]
        if self.mirror is not None:
            self.mirror.absorb(res.ranges[0], res.revision)

    def quarantine(self, policy, failed_at: float | None, wall: float) -> Quarantine | None:
        """This node's quarantine record (``P/quarantine/<node>``), with the failure at ``failed_at`` added (one
        guarded txn) when given. The key is watched from the first call on (read, then watch), so the record is
        always the one in etcd: an operator who deletes it lets the node in at once (``quarantine_lifted``)."""
        key = self.keys.quarantine(self.node)
        self._ensure("quarantine", key, b"")
        for _ in range(MAX_QUARANTINE_TRIES):
            kv = self.mirror.get(key)
            current = self.mirror.record(kv, Quarantine) if kv else None
            if failed_at is not None:
                new = quarantine.record_failure(current, self.node, failed_at, policy, wall)
                res = txns.put_quarantine(self.etcd, key, kv, new)
                if not res.succeeded:
                    self._read_key(key)  # written by someone else since: count on what is there now
                    continue
                self.mirror.absorb(res.ranges[0], res.revision)
                kv, current = res.ranges[0][0], new
            self._held_by = kv if quarantine.quarantined(current, wall) else None
            return current
        raise BadKeyData(key, "kept changing while this agent counted its failure; is another agent using this "
                              "node id?")

    def quarantine_lifted(self) -> bool:
        """Whether this node's quarantine record changed (an operator deleted or rewrote it) since it last held the
        node out: the node checks itself again now, not when that record's cooldown would have ended."""
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

    def set_health(self, problem: str, announce: bool = False) -> None:
        """Say in this node's registry entry why it is unhealthy ("" healthy again), for the leader and ``status``;
        the first pass also ends ``checking`` (the node counts from then on), in the same write. ``announce``: write
        the entry even when nothing changed (a scale-up passed this node over: the leader may scale up for it once
        more)."""
        checking = self.checking and bool(problem)
        if problem == self.health and checking == self.checking and not announce:
            return
        self.health, self.checking = problem, checking
        kv = self._registration
        info = dataclasses.replace(NodeInfo.from_kv(kv), health=problem, checking=checking)
        res = txns.update_registration(self.etcd, kv, info, self.session.lease_id)
        if res.succeeded:
            self._registration = res.ranges[0][0]
            self.mirror.absorb(res.ranges[0], res.revision)

    def close(self, why: str = "") -> None:
        """Stop the watches, revoke the lease (this node's keys vanish at once) unless it is lost, close the
        client. ``why`` this agent leaves (``received SIGTERM``): when it is the last live agent of a job that has
        no result, it ends the job ``stopped`` with that reason (``abandon.end_if_last``)."""
        if self.stream is not None:
            self.stream.cancel()
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
    def _ensure(self, name: str, start: str, end: bytes, snapshot: tuple[list, int] | None = None) -> None:
        """Watch ``[start, end)`` under ``name`` (an empty ``end``: the one key ``start``): read it (or take
        ``snapshot``, a read made by a txn), put it into the mirror, and watch from that read's revision + 1, so
        no change is missed. What was watched under that name before is dropped first. All of an agent's ranges
        share one watch stream."""
        current = self._watches.get(name)
        if current is not None and current[1:] == (start, end):
            return
        if current is not None:
            self._unwatch(name)
        kvs, rev = snapshot if snapshot is not None else self.etcd.get_range(start, end)
        self.mirror.reset_range(start, end, kvs, rev)
        self.strays.note(kvs)
        self._known[name] = rev
        if self.stream is None:
            self.stream = WatchStream(self.etcd, lambda n, token, d: self._sink(("watch", (n, token, d))),
                                      probe_interval=self.timings.watch_probe, name=f"watch-{self.node}").start()
        self._watches[name] = (self.stream.add(name, start, end, rev + 1), start, end)

    def _unwatch(self, name: str, drop: bool = True) -> None:
        """Stop watching ``name`` and, when ``drop``, forget what only it kept current (this node's own keys and
        plans stay)."""
        current = self._watches.pop(name, None)
        if current is None:
            return
        _token, start, end = current
        self.stream.remove(name)
        self._known.pop(name, None)
        if drop and self.mirror is not None:
            self.mirror.drop_range(start, end, keep=self._own)

    def watch_bad(self, key: str | None) -> bool:
        """Watch ``key``, whose bad value holds this agent (None: nothing holds it any more), whatever its role
        watches: its repair or deletion always reaches the agent, also where the key was read only once (after a
        failed compare). True when the read that starts the watch found the key changed already (no event is
        coming then). The key stays in the mirror when the watch ends (another watch may cover it)."""
        if key is None or not key.startswith(self.keys.prefix):
            self._unwatch("bad", drop=False)
            return False
        if self._watches.get("bad", (0, None))[1] != key:
            self._unwatch("bad", drop=False)
        before = self.mirror.get(key)
        try:
            self._ensure("bad", key, b"")
        except EtcdUnavailable as exc:
            self.log.warning("cannot watch %s yet, trying again: %s", key, exc)
            return True  # decide again: the key is read (and watched) again on the next hold
        return self.mirror.get(key) is not before

    def _own(self, key: str) -> bool:
        """Keys the mirror keeps whatever it watches: this node's own and the plans (who ran, who runs)."""
        try:
            parsed = self.keys.parse(key)
        except BadKeyData:
            return False
        return parsed.node == self.node or parsed.kind == "plan"

    def maintain(self) -> None:
        """Watch what this agent's role in the current round needs, before it decides (O(1) watch events per
        write that concerns it, instead of every write of the job):

        - every agent: the job-wide keys (round, restarts, result, spec), and its own keys through its txns;
        - the round's leader (the joiner with the lowest create revision while joining; the plan's ``leader``
          while running): the registry and every key of the round (joins, exits, failures);
        - a joiner that does not lead: the leader's join key (it leads next if that key vanishes);
        - an unhealthy node that does not join a forming round: the registry and every key of the round, as the
          leader does (if nobody joins by the join timeout, it ends the job; the timeout names the unhealthy nodes);
        - a member that does not lead: the join key of its predecessor in rank order (a ring), so every member's
          loss is seen by its successor and by the leader.
        Reads here are one key or one range each; the plan is read once per round."""
        m, k = self.mirror, self.keys
        r = m.round()
        if r is not None and r.number != self._round:
            self._round = r.number
            m.prune(r.number, r.last_plan)
        if r is None or r.phase in FINAL_PHASES or m.get(k.result()) is not None:
            self._role(False)
            return
        n = r.number
        if r.last_plan and m.get(k.plan(r.last_plan)) is None:
            self._read_key(k.plan(r.last_plan))  # who ran last: this node's prev_rank, the leader's fast path
        if r.phase == JOINING:
            mine = m.get(k.join(n, self.node))
            if mine is None or mine.lease != self.session.lease_id:
                # Not joined yet: the join txn tells who leads. An unhealthy node watches the registry and the round
                # (it fails the job if nobody joins by the join timeout, naming the unhealthy nodes).
                self._role(bool(self.health) or self.awaiting, n)
                return
            for _ in range(3):
                leader = self._leaders.get(n)
                if leader == self.node:
                    self._role(True, n)
                    return
                if leader is not None and m.get(k.join(n, leader)) is not None:
                    self._role(False, peer=k.join(n, leader))
                    return
                self._find_leader(n)  # the leader's key vanished (or is not known): who leads now?
            return
        plan = m.plan(n)
        if plan is None:
            self._read_key(k.plan(n))
            plan = m.plan(n)
        if plan is None or plan.member(self.node) is None:
            self._role(self.awaiting, n)
        elif plan.leader_node == self.node:
            self._role(True, n)
        else:
            pred = plan.predecessor(self.node)
            self._role(False, peer=k.join(n, pred) if pred else None)

    def _role(self, full: bool, rnd: int = 0, peer: str | None = None) -> None:
        k = self.keys
        r = self.mirror.round()
        if full:
            self._unwatch("peer")
            self._ensure("registry", k.nodes(), prefix_end(k.nodes()))
            self._ensure("round", k.round_dir(rnd), prefix_end(k.round_dir(rnd)))
            if r is not None and r.last_plan:  # who is blamed for the last round (``blame.py``)
                self._ensure("blame", k.failures(r.last_plan), prefix_end(k.failures(r.last_plan)))
        else:
            self._unwatch("registry")
            self._unwatch("round")
            self._unwatch("blame")
            if peer is None:
                self._unwatch("peer")
            else:
                self._ensure("peer", peer, b"")
        self.scope = Scope(full, frozenset() if full or peer is None else frozenset({peer.rsplit("/", 1)[1]}))

    def _read_key(self, key: str) -> None:
        kv, rev = self.etcd.get(key)
        self.mirror.reset_range(key, b"", [kv] if kv else [], rev)

    def _find_leader(self, rnd: int) -> None:
        res = txns.leader(self.etcd, self.keys, rnd)
        self._take_leader(rnd, res.ranges[0], res.revision)

    def _take_leader(self, rnd: int, oldest: list, revision: int) -> None:
        """The round's leader, from a read of the oldest keys under its joins: the first that is a join key (keys
        planted below the joins are not, and are ignored with a warning)."""
        first = None
        for kv in oldest:
            if self._kind(kv.key) == "join":
                first = kv
                break
            self.strays.say(kv.key)
        if first is not None:
            self.mirror.absorb([first], revision)
            self._leaders[rnd] = first.key.rsplit("/", 1)[1]
            if self._leaders[rnd] != self.node:  # watch it from this read on: its vanishing is never missed
                self._ensure("peer", first.key, b"", ([first], revision))
        else:
            self._leaders.pop(rnd, None)

    def _kind(self, key: str) -> str | None:
        try:
            return self.keys.parse(key).kind
        except BadKeyData:
            return None

    def _drop_ghost_exits(self, view: View) -> None:
        """Keys under the round's exits that are no member's exit (a node outside the plan's, planted by hand or left
        by a job of another prefix; junk below the exits such as ``exit/a/b``) would make every restart's guard fail
        (a restart requires the round to have no key under its exits): delete them, each guarded by its revision,
        saying so once. A non-leader knows the round's exits only after a failed compare re-read them."""
        ghosts = self.strays.ghost_exits(view.plan) if view.plan is not None else []
        if ghosts:
            res = txns.delete_strays(self.etcd, ghosts)
            if res.succeeded:
                for kv in ghosts[:txns.MAX_STRAYS]:
                    self.mirror.forget(kv.key, res.revision)

    # --- the mirror ------------------------------------------------------------------------------------------
    def apply(self, item) -> None:
        """A watch delivery into the mirror; a delivery of a watch stopped since is no news."""
        name, token, delivery = item
        current = self._watches.get(name)
        if current is None or current[0] != token:
            return
        _w, start, end = current
        if isinstance(delivery, Resync):
            self.mirror.reset_range(start, end, delivery.kvs, delivery.revision)
            self.strays.note(delivery.kvs)
            self._known[name] = delivery.revision
        else:
            self.mirror.apply(delivery)  # first: a plan in the same delivery tells whose exits and failures count
            self.strays.note(ev.kv for ev in delivery if ev.kind == "put")
            if delivery:
                self._known[name] = max(self._known.get(name, 0), delivery[-1].kv.mod_revision)

    def view(self) -> View:
        """What decide() sees; for the leader, the round's joins are known through the round watch's revision
        (the close guard refuses a plan if any join key was written after it). A key whose value cannot be read
        raises BadKeyData (the agent holds until it is repaired), unless the job has ended: then the view is the
        result alone, so that an ``etcd-agent stop`` always reaches the agent."""
        try:
            return self.mirror.view(self.scope, self._known.get("round") if self.scope.full else None)
        except BadKeyData:
            ended = self.mirror.ended(self.scope)
            if ended is None:
                raise
            return ended

    def resync(self) -> None:
        """After a failed compare: read again what the compares were about (the job-wide keys, this node's join
        key, the round's exits and failures; for the leader the registry and the round) in one txn, never the
        whole job."""
        k, m = self.keys, self.mirror
        r = m.round()
        n = r.number if r else 0
        ranges = [k.control()]
        if n:
            ranges += [(k.join(n, self.node), b""), (k.exits(n), prefix_end(k.exits(n))),
                       (k.failures(n), prefix_end(k.failures(n)))]
        for name in ("registry", "round", "peer"):
            if name in self._watches:
                ranges.append(self._watches[name][1:])
        res = self.etcd.txn([], [op_get_range(start, end) for start, end in ranges],
                            where="re-read after a failed compare")
        for (start, end), kvs in zip(ranges, res.ranges):
            m.reset_range(start, end, kvs, res.revision)
        for name in ("control", "registry", "round", "peer"):
            if name in self._watches:
                self._known[name] = max(self._known.get(name, 0), res.revision)

    # --- guarded txns ----------------------------------------------------------------------------------------
    def act(self, action, view: View, join_info: Callable[[], Join]) -> TxnResult:
        """One guarded txn for a rendezvous action; logs what it changed. ``join_info`` makes this node's join
        record (only a join needs it). A failed compare is no error: the caller resyncs and decides again."""
        node, wall = self.node, time.time()
        if isinstance(action, JoinRound):
            old = self.joined_round
            res = txns.join(self.etcd, self.keys, action, node, join_info(), self.session.lease_id, old)
            if res.succeeded:
                n = self.joined_round = action.round.number
                if old and old != n:
                    self.mirror.forget(self.keys.join(old, node), res.revision)
                self._take_leader(n, res.ranges[1], res.revision)
                self.log.info("joined round %d (%s leads it)", n, self._leaders.get(n, "nobody"))
        elif isinstance(action, ClosePlan):
            res = txns.close(self.etcd, self.keys, action, wall)
            if res.succeeded:
                torchrun = self.cfg.spec.nproc_per_node == TORCHRUN_NPROC
                workers = "" if torchrun else f" ({action.plan.world_size} workers)"
                self.log.info("closed round %d with %d node(s)%s: %s", action.round.number,
                         len(action.plan.members), workers, ", ".join(action.plan.nodes))
        elif isinstance(action, Bump):
            self._drop_ghost_exits(view)
            rs = view.restarts
            res = txns.bump(self.etcd, self.keys, action, rs.used if rs else 0, rs.max if rs else 0,
                            rs.mod_revision if rs else 0, node, wall)
            if res.succeeded:
                limit = f" of {rs.max}" if rs and rs.max < NO_RESTART_LIMIT else ", no job-wide limit"
                counted = f"restart {rs.used + 1}{limit}" if action.counted and rs else "not counted"
                self.log.warning("restarting the job: %s (%s)", action.reason, counted)
        elif isinstance(action, WriteExit):
            res = txns.write_exit(self.etcd, self.keys, action, node, wall)
        elif isinstance(action, End):
            res = txns.end(self.etcd, self.keys, action, node, wall)
        elif isinstance(action, ReportLoss):
            res = self._report_loss(action, view)
        else:
            raise TypeError(f"{action!r} is not an etcd action")
        if res.succeeded:  # what the txn wrote, read back in it: the mirror has it before any watch shows it
            for kvs in res.ranges:
                self.mirror.absorb(kvs, res.revision)
        return res

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
