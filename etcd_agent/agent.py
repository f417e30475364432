r"""The agent: one per node. A state machine over the coordination layer (``coord.coordinator.Coordinator``: etcd,
session, watch, mirror, guarded txns) and this node's worker group (``node.api.Group``).

States (an Enum, a transition table, one ``_enter``; the state picks what the run loop does next)::

    STARTING --open--> RENDEZVOUS <--rounds--> RUNNING --the job ended--> FINISHED
                           ^   \ session lost    / session lost
                           |    v                v
                           +---- FENCED: workers stopped before the lease can expire; a new session rejoins

One queue carries everything that can happen, as frozen records defined where they are posted: watch deliveries
(``coord.watches``), the group's verdict (``node.api``), the node checks' verdicts (``node.checks``), a lost session
(``LostSession``, from the keepalive thread), a signal (``Signalled``, through ``leave``) and ``Leave`` (from an
owner that runs the agent on a thread of its own). One table maps each event type to its handler, another each
``decide`` action type to what the agent does (its workers through ``node.supervisor``, etcd through the
coordinator). In RENDEZVOUS and RUNNING the loop applies what happened, notes it (``coord.observe``), decides and
acts; it never sleeps to synchronize, but waits on the queue, bounded by the decision's deadline. Nothing slow runs
on it: the health check and GPU drain run on threads (``node.checks``), the hang check in the group.

The one module that combines ``coord/`` and ``node/``; imports ``etcd/`` and the base modules too, never ``ops/``,
``cli/``, ``torch/`` or ``testing/``.
"""

from __future__ import annotations

import dataclasses
import enum
import queue
import signal
import threading
import time

from . import logs, metrics, proctree
from .config import AgentConfig
from .coord.coordinator import NOSPACE_RETRY, Coordinator
from .coord.decide import (Attribute, CheckHealth, Finish, JoinRound, Local, Params, StartWorkers, StopWorkers,
                           Wait, decide, job_error)
from .coord.observe import observe
from .coord.waiting import Said, wait_note
from .coord.watches import WatchDelivery
from .errors import BadKeyData, EtcdNoSpace, EtcdUnavailable, JobStopped, SessionLost
from .etcd.session import Session
from .coord.mirror import View
from .node import hooks
from .node.api import Assignment, GroupEvent, GroupFactory, GroupFailed, GroupSucceeded
from .node.checks import CheckEvent, Checks, Drained, HealthChecked
from .node.env import check_log_tree
from .node.supervisor import Supervisor
from .node.workers import WorkerGroup
from .schema.values import Outcome

log = logs.get("etcd_agent.agent")


@dataclasses.dataclass(frozen=True)
class LostSession:  # the keepalive thread declared ``session`` lost (``why``)
    session: Session
    why: str


@dataclasses.dataclass(frozen=True)
class Leave:  # the owner of an embedded agent (torchrun's backend) ends it: ``run`` raises JobStopped(``why``)
    why: str


@dataclasses.dataclass(frozen=True)
class Signalled:  # a --signals-to-handle signal arrived (``Agent.leave``): the agent stops its workers with it, leaves
    signum: int


QueueEvent = WatchDelivery | GroupEvent | CheckEvent | LostSession | Leave | Signalled


class State(enum.Enum):
    STARTING = "starting"
    RENDEZVOUS = "rendezvous"
    RUNNING = "running"
    FENCED = "fenced"
    FINISHED = "finished"


_TRANSITIONS = {
    State.STARTING: {State.RENDEZVOUS, State.FINISHED}, State.RENDEZVOUS: {State.RUNNING, State.FENCED, State.FINISHED},
    State.RUNNING: {State.RENDEZVOUS, State.FENCED, State.FINISHED}, State.FENCED: {State.RENDEZVOUS, State.FINISHED},
    State.FINISHED: set()}


class Agent:
    def __init__(self, cfg: AgentConfig, version: str = "", group_factory: GroupFactory = WorkerGroup):
        """``group_factory`` makes this node's worker group for a round (``WorkerGroup``; torchrun's backend and
        simulations of many nodes pass groups of their own: ``node.api``)."""
        self.cfg, self.version = cfg, version
        self.params = Params(cfg.spec.min_nodes, cfg.spec.max_nodes, cfg.spec.max_restarts, cfg.last_call,
                             cfg.join_timeout, cfg.scale_settle, cfg.timings.lease_ttl, cfg.no_restart_exit_code)
        self.shutdown = threading.Event()
        self.events: queue.SimpleQueue[QueueEvent] = queue.SimpleQueue()  # put() is safe from a signal handler
        self.where = logs.Where(cfg.run_id, cfg.node_id)  # every line this agent logs says run, node and round
        self.log = log.bound(self.where)
        self.state = State.STARTING
        self.local = Local(cfg.node_id, time.monotonic(), time.time(), ready=not cfg.health.active)
        self.signalled = 0
        self._wait_said = Said()  # the wait last said at INFO: when, and what it said
        self._passed_said: set[tuple[str, int]] = set()  # (node, registry revision) said to be passed over
        self.checks = Checks(cfg, self.events.put, self.log)  # health check and GPU drain, off this loop
        self.workers = Supervisor(cfg, self.events.put, group_factory, self.checks, self.where, self.log)
        self.coord = Coordinator(cfg, version, self.events.put, self.shutdown, self.where, self.workers.progress)
        self.on_event = {WatchDelivery: self.coord.apply, GroupSucceeded: self.workers.succeeded,
                         GroupFailed: self._failed, HealthChecked: self.checks.health_done,
                         Drained: lambda e: self.checks.drain_done(e, self.where.round),
                         LostSession: self._lost, Leave: self._leave, Signalled: self._signalled}
        self.on_action = {**dict.fromkeys(Coordinator.TXNS, self._txn), JoinRound: self._join, Wait: self._wait,
                          Finish: self._finish, StopWorkers: self._stop, StartWorkers: self._start,
                          CheckHealth: self._check_health, Attribute: self.coord.attribute}

    @property
    def session(self) -> Session | None:
        return self.coord.session

    @property
    def keys(self):
        return self.coord.keys

    # --- state machine -------------------------------------------------------------------------------------
    def _enter(self, new: State, why: str, event: str = "state", **fields) -> None:
        if new is self.state:
            return
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"agent state {self.state.value} -> {new.value} is not allowed ({why})")
        self.log.info("%s -> %s: %s", self.state.value, new.value, why, event=event,
                      fields={"state": new.value, "previous": self.state.value, **fields})
        self.state = metrics.agent_state(new, self.where)  # the state and round gauges follow it

    def _set(self, **changes) -> None:
        if any(getattr(self.local, name) != value for name, value in changes.items()):  # a copy only on a change
            self.local = dataclasses.replace(self.local, **changes)

    # --- lifecycle -----------------------------------------------------------------------------------------
    def run(self) -> int:
        """Run the job on this node; returns the process exit code (or raises the job's end as an AgentError)."""
        _start_relay()
        logs.running(self.where)
        why = ""  # why this agent leaves a job that may have no result yet (then, if it is the last, it ends it)
        try:
            while True:
                code = self._run_state()
                if code is not None:
                    return code
        except BaseException as exc:
            why = f"received {proctree.signal_name(self.signalled)}" if self.signalled else \
                f"exited ({type(exc).__name__}: {exc})"
            raise
        finally:
            self._cleanup(why)
            logs.stopped(self.where)

    def leave(self, signum: int) -> None:
        """What a ``--signals-to-handle`` signal does (and a simulation's graceful leave): record the signal (the
        workers are stopped with it), post ``Signalled`` (``run`` raises JobStopped) and have the shutdown event set
        (etcd retries stop waiting). Only posts, so it is safe in a signal handler: no thread, no lock."""
        self.signalled = signum
        self.events.put(Signalled(signum))
        _relay.put(self.shutdown)

    def _run_state(self) -> int | None:
        """One turn of the loop, chosen by the state; etcd trouble and bad data never end the job from here."""
        if self.state is State.STARTING:
            check_log_tree(self.cfg.workers, self.cfg.run_id, self.log)  # a log tree not ours: an error before joining
            self.workers.prepare()  # a --preload that cannot be imported is an error before the job is joined
            self.coord.open(self._session_lost)
            self._set(lease=self.session.lease_id)
            self._enter(State.RENDEZVOUS, f"registered in job {self.keys.gen} on etcd {self.coord.etcd_version} "
                        f"(lease {self.session.lease_id:x})")
            return None
        try:
            return self._rejoin() if self.state is State.FENCED else self._step()
        except SessionLost as exc:  # our lease ended before the keepalive thread could say so
            self._fence(str(exc))
        except EtcdNoSpace as exc:
            # Keep the workers as they are and try the same decision again every NOSPACE_RETRY seconds (sooner when
            # something happens); a worker failure or a finished node meanwhile is acted on once a write succeeds.
            self.coord.refused(exc)
            self._drain(block=True, deadline=time.monotonic() + NOSPACE_RETRY)
        except EtcdUnavailable as exc:
            # Keep the workers; the session fences them if the outage outlasts the lease.
            self.log.warning("etcd is unreachable, trying again: %s", exc)
            self._drain(block=True, deadline=time.monotonic() + 0.5)
        except BadKeyData as exc:
            # Never act on state we cannot read, and never harm the job for it: wait for a repair (the key is
            # watched while it holds the agent, so its repair or deletion always arrives) or for the job's end.
            if not self.coord.hold_for(exc):  # True: repaired already, decide again at once
                self._drain(block=True)
        else:
            self.coord.readable()
        return None

    def _cleanup(self, why: str = "") -> None:
        self.shutdown.set()
        self.workers.stop("the agent is exiting", self.signalled)
        self.checks.close()
        self.workers.close()
        self.coord.close(why)

    # --- the loop ------------------------------------------------------------------------------------------
    def _step(self) -> int | None:
        """Handle what happened, decide, act once; returns the exit code when the job is over."""
        self._drain(block=False)
        if self.state is State.FENCED:
            return None  # the session was lost just now: nothing is decided on its view; FENCED rejoins
        self.coord.maintain()
        view = self.coord.view()
        self._observe(view)
        action = decide(view, self.local, self.params)
        return self.on_action[type(action)](action, view)

    def _drain(self, block: bool, deadline: float | None = None) -> type | None:
        """Handle queued events, first waiting for one (until ``deadline``) when ``block``: None (none handled),
        ``WatchDelivery`` (watch deliveries only) or ``object``."""
        timeout, kinds = None if deadline is None else max(0.0, deadline - time.monotonic()), None
        try:
            event = self.events.get(timeout=timeout) if block else self.events.get_nowait()
            while True:
                self._handle(event)
                kinds = WatchDelivery if type(event) is WatchDelivery and kinds in (None, WatchDelivery) else object
                event = self.events.get_nowait()
        except queue.Empty:
            return kinds

    def _handle(self, event: QueueEvent) -> None:
        self.on_event[type(event)](event)

    def _observe(self, v: View) -> None:
        """Note what the view says (``coord.observe``: first sightings, this agent's round) and log it."""
        w = self.workers
        self._set(checking=self.checks.checking, draining=self.checks.draining, workers_round=w.round,
                  workers_running=w.running, outcome=w.outcome, failure=w.failure, pending=self.coord.pending,
                  step=w.steps.step())
        lifted = bool(self.local.unhealthy) and self.coord.quarantine.lifted()
        self.local, notes = observe(v, self.local, self.params, time.monotonic(), time.time(), lifted)
        if notes.new_round is not None:  # the round this agent is in: its log lines say it
            self.where.round = notes.new_round
        for seen in notes.passed_over:  # the leader says once per registry entry that a scale-up passed a node over
            if seen not in self._passed_said:
                self._passed_said.add(seen)
                self.log.warning("%s was not taken into round %d, the scale-up made for it; the job does not scale "
                                 "up for it again until its registry entry changes (a live agent rewrites it when "
                                 "it passes its health check again)", seen[0], v.round.number)

    # --- events --------------------------------------------------------------------------------------------
    def _failed(self, e: GroupFailed) -> None:
        late = self.workers.failed(e)
        if late is not None:
            self.coord.report_failure(late)

    def _lost(self, e: LostSession) -> None:
        if e.session is self.session and self.state is not State.FENCED:  # else a late report: old news
            self._fence(e.why)

    def _leave(self, e: Leave) -> None:
        raise JobStopped(e.why)

    def _signalled(self, e: Signalled) -> None:
        raise JobStopped(f"{self.cfg.node_id} received {proctree.signal_name(e.signum)}: stopped its workers and left "
                         "the job")

    # --- actions (each returns None, but Finish its exit code) ---------------------------------------------
    def _wait(self, action: Wait, view: View) -> None:
        """Say what it waits for (``waiting.wait_note``: while a round forms, on a change and every period), then
        wait: until the decision's deadline, the next such line, or the next spare refill. A wake by watch news that
        changed nothing decided on (``Roles.news``: old news, a replay) waits on, as if it never came."""
        note = wait_note(action, view, self.local, self.params, self.state is State.RENDEZVOUS, self._wait_said,
                         time.monotonic())
        self.log.info("%s", note.line) if note.line else self.log.debug("waiting: %s", action.why)
        self._wait_said = note.said
        wake = (action.deadline, note.next_at, self.workers.refill())
        deadline, news = min((d for d in wake if d is not None), default=None), self.coord.roles.news
        before = news()
        while self._drain(block=True, deadline=deadline) is WatchDelivery and news() == before:
            pass

    def _txn(self, action, view: View) -> None:
        """An etcd action: one guarded txn (``Coordinator.act``); after a failed compare, re-read what it compared."""
        if not self.coord.act(action, view).succeeded:
            self.coord.resync()

    def _join(self, action: JoinRound, view: View) -> None:
        if not self._healthy():  # a cluster-wide quarantine holds out a node of any job
            return  # it does not join; decide() waits until the next check is due
        self._txn(action, view)

    def _check_health(self, action: CheckHealth, view: View) -> None:
        self._healthy(action.announce)

    def _healthy(self, announce: bool = False) -> bool:
        """The gate before a join: the coordinator's side (this node's quarantine record) and the node's side (its
        health verdict, backoff and what it logs: ``node.checks.Checks.gate``) combined; the verdict goes into the
        registry entry. False until the check's verdict is in; ``announce`` writes the entry on a pass even when
        nothing changed there (a scale-up passed this node over)."""
        held, wait = self.coord.quarantine.holds(self.cfg.quarantine, time.time())
        began, self.coord.quarantine.began = self.coord.quarantine.began, None
        if began is not None:  # this agent's write started it: the scheduler hook runs once, off the loop
            hooks.start(self.cfg.quarantine.on_quarantine, self.cfg.quarantine.hook_timeout, began, self.log)
        gate = self.checks.gate(held, wait)
        if gate is None:
            self._set(checking=True)  # decide() waits for the verdict, which wakes the loop
            return False
        if gate.problem:
            self.coord.set_health(gate.problem)
            self._set(unhealthy=gate.problem, health_retry_at=gate.retry_at)
            return False
        if announce:
            self.log.info("round %d's scale-up did not take this node in; it is ready and says so again in its "
                          "registry entry", self.where.round)
        self.coord.set_health("", announce)
        self._set(unhealthy="", health_retry_at=0.0, ready=True)
        return True

    def _stop(self, action: StopWorkers, view: View) -> None:
        if self.workers.outcome == Outcome.FAILED:  # our failure lost the race to another node's bump or end
            self.coord.report_failure(self.workers.failure)
        self.workers.stop(action.why, self.signalled, next_round=view.result is None)
        if self.state is State.RUNNING and view.result is None:  # a new round: back to rendezvous, saying why once
            said = not action.cause or view.round is not None and self.coord.said_restart == view.round.number
            self._enter(State.RENDEZVOUS, action.why if said else f"{action.why} ({action.cause})")

    def _start(self, a: StartWorkers, view: View) -> None:
        plan = a.plan
        started = self.workers.start(Assignment.of(self.cfg.run_id, plan, a.member, self.keys.gen))
        if started is not None:
            self._enter(State.RUNNING, f"{started}, master {plan.master_addr}:{plan.master_port}, restart count "
                        f"{plan.restart_count}")

    def _finish(self, action: Finish, view: View) -> int:
        result = action.result
        self.workers.stop("the job ended", self.signalled)
        ok = result.outcome == Outcome.SUCCEEDED  # a failure's cause is said once, by the error raised below
        self._enter(State.FINISHED, f"job {result.outcome} in round {result.round}" + (
            f" after {result.restarts} restart(s)" if ok else ""), "job_ended", outcome=result.outcome.value)
        if ok:
            return 0
        raise job_error(result)(result.ended(self.cfg.run_id))

    # --- workers and the session ---------------------------------------------------------------------------
    def _session_lost(self, session: Session, why: str) -> None:
        """On the keepalive thread, the moment the session is declared lost: the main loop may be blocked in an
        etcd call, so the workers are stopped right here, within the fencing margin, before the lease can expire."""
        self.events.put(LostSession(session, why))
        if session is self.session:
            self.workers.fence(why, self.coord.timings.fence_grace)

    def _fence(self, why: str) -> None:
        """Our lease is (about to be) gone: stop the workers before peers re-form without us; FENCED rejoins."""
        self._enter(State.FENCED, f"session lost ({why}); stopping workers before the lease can expire")
        if self.workers.outcome == Outcome.FAILED:
            try:
                self.coord.report_failure(self.workers.failure)
            except EtcdUnavailable:
                self.log.warning("could not record this node's failure report: etcd is unreachable")
        self.workers.stop(f"self-fencing: {why}", self.signalled)
        self.workers.forget()
        self.coord.drop_session()  # etcd may be unreachable: the stale lease is revoked once it is back

    def _rejoin(self) -> None:
        """FENCED: open a new session (its registration revokes the stale leases first); until --join-timeout."""
        self._drain(block=False)  # a signal still ends the agent
        if self.coord.rejoin(self._session_lost):
            self._set(lease=self.session.lease_id)
            self._enter(State.RENDEZVOUS, f"new session (lease {self.session.lease_id:x}); rejoining")


# Event.set takes a lock that a thread interrupted by a signal may hold, so ``Agent.leave`` (a signal handler) never
# calls it: it posts the event here, and this process's relay thread, started before any handler runs, sets it.
_relay: queue.SimpleQueue[threading.Event] = queue.SimpleQueue()
_relay_lock = threading.Lock()
_relay_thread: threading.Thread | None = None


def _start_relay() -> None:
    """Start the relay thread once per process (never from a signal handler: starting a thread takes a lock)."""
    global _relay_thread
    with _relay_lock:
        if _relay_thread is None:
            _relay_thread = threading.Thread(target=_relay_events, name="signals", daemon=True)
            _relay_thread.start()


def _relay_events() -> None:
    while True:
        _relay.get().set()  # etcd retries stop waiting


def install_signal_handlers(agent: Agent, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """``--signals-to-handle`` (torchrun's default SIGTERM, SIGINT, SIGHUP, SIGQUIT): stop the workers with that
    same signal, revoke the lease, exit 128+N (from the main thread's loop). The handler only posts
    (``Agent.leave``: SimpleQueue.put is reentrant, safe in a signal handler)."""
    _start_relay()

    def handler(signum, _frame):
        agent.leave(signum)
    for sig in signals:
        signal.signal(sig, handler)
