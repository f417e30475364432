r"""The agent: one per node. A state machine over the coordination layer (``coordinator.Coordinator``: etcd,
session, watch, mirror, guarded txns) and this node's worker group.

States (an Enum, a transition table, one ``_enter``; the state picks what the run loop does next)::

    STARTING --open--> RENDEZVOUS <--rounds--> RUNNING --the job ended--> FINISHED
                           ^   \ session lost    / session lost
                           |    v                v
                           +---- FENCED: workers stopped before the lease can expire; a new session rejoins

One queue carries everything that can happen (watch deliveries, worker exits, session loss, signals, and
``("leave", why)`` from an owner that runs the agent on a thread of its own); in
RENDEZVOUS and RUNNING the loop applies it to the mirror, asks ``rendezvous.decide`` what to do and does it: a
worker action itself, an etcd action through the coordinator. Never sleeps to synchronize: it waits on the queue,
bounded by the decision's deadline.

The one module that combines ``coord/`` (the coordinator, decisions, mirror) and ``node/`` (the worker group, spares,
the health gate); imports ``etcd/`` and the base modules too, never ``ops/``, ``cli/``, ``torch/`` or ``testing/``.
"""

from __future__ import annotations

import dataclasses
import enum
import queue
import signal
import threading
import time
from typing import Callable

from . import logs
from .node import health
from .node.checks import Checks
from .config import AgentConfig, worker_base_env
from .coord.coordinator import NOSPACE_RETRY, Coordinator
from .errors import BadKeyData, EtcdNoSpace, EtcdUnavailable, JobStopped, SessionLost
from .coord.decide import (Attribute, CheckHealth, Finish, JoinRound, Local, Params, StartWorkers, StopWorkers,
                           Wait, decide, describe_failure, job_error)
from .coord.observe import observe, wait_note
from .etcd.session import Session
from .coord.mirror import View
from .schema.values import Outcome, Result
from .node.warm import SparePool
from .node.api import Assignment, WorkerExit
from .node.env import check_log_tree, log_root, worker_env
from .node.workers import WorkerGroup

log = logs.get("etcd_agent.agent")


class State(enum.Enum):
    STARTING = "starting"
    RENDEZVOUS = "rendezvous"
    RUNNING = "running"
    FENCED = "fenced"
    FINISHED = "finished"


_TRANSITIONS = {
    State.STARTING: {State.RENDEZVOUS, State.FINISHED},
    State.RENDEZVOUS: {State.RUNNING, State.FENCED, State.FINISHED},
    State.RUNNING: {State.RENDEZVOUS, State.FENCED, State.FINISHED},
    State.FENCED: {State.RENDEZVOUS, State.FINISHED},
    State.FINISHED: set(),
}


class Agent:
    def __init__(self, cfg: AgentConfig, version: str = "", group_factory: Callable[..., WorkerGroup] = WorkerGroup):
        """``group_factory`` makes this node's worker group for a round (``WorkerGroup``; simulations of many nodes
        pass a stand-in with the same methods)."""
        self.cfg = cfg
        self._group_factory = group_factory
        self.version = version
        self.params = Params(cfg.spec.min_nodes, cfg.spec.max_nodes, cfg.spec.max_restarts, cfg.last_call,
                             cfg.join_timeout, cfg.scale_settle, cfg.timings.lease_ttl)
        self.shutdown = threading.Event()
        self.events: queue.SimpleQueue = queue.SimpleQueue()  # put() is safe from a signal handler
        self.where = logs.Where(cfg.run_id, cfg.node_id)  # every line this agent logs says run, node and round
        self.log = log.bound(self.where)
        self.coord = Coordinator(cfg, version, lambda d: self.events.put(("watch", d)), self.shutdown, self.where)
        self.state = State.STARTING
        self.group: WorkerGroup | None = None
        self.local = Local(cfg.node_id, time.monotonic(), time.time(), ready=not cfg.health.active)
        self.signalled = 0
        self._wait_said: tuple[str, float] = ("", 0.0)  # the wait reason last logged at INFO, and when
        self._health_failures = 0  # failed health checks in a row
        self._passed_said: set[tuple[str, int]] = set()  # (node, registry revision) said to be passed over
        self.checks = Checks(cfg, self.events.put, self.log)  # health check and GPU drain, off this loop
        self.spares: SparePool | None = None  # --warm-restart: this node's pre-started interpreters
        if cfg.workers.warm_restart:
            self.spares = SparePool(cfg.workers, log_root(cfg.workers, self.log), cfg.run_id, cfg.node_id,
                                    logs.get("etcd_agent.node.warm", self.where), gpus=cfg.health.gpus is not None)

    @property
    def session(self) -> Session | None:
        return self.coord.session

    @property
    def keys(self):
        return self.coord.keys

    # --- state machine -------------------------------------------------------------------------------------
    def _enter(self, new: State, why: str) -> None:
        if new is self.state:
            return
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"agent state {self.state.value} -> {new.value} is not allowed ({why})")
        self.log.info("%s -> %s: %s", self.state.value, new.value, why)
        self.state = new

    def _set(self, **changes) -> None:
        self.local = Local(**{**self.local.__dict__, **changes})

    # --- lifecycle -----------------------------------------------------------------------------------------
    def run(self) -> int:
        """Run the job on this node; returns the process exit code (or raises the job's end as an AgentError)."""
        logs.running(self.where)
        why = ""  # why this agent leaves a job that may have no result yet (then, if it is the last, it ends it)
        try:
            while True:
                code = self._run_state()
                if code is not None:
                    return code
        except BaseException as exc:
            why = f"received {signal.Signals(self.signalled).name}" if self.signalled else \
                f"exited ({type(exc).__name__}: {exc})"
            raise
        finally:
            self._cleanup(why)
            logs.stopped(self.where)

    def _run_state(self) -> int | None:
        """One turn of the loop, chosen by the state; etcd trouble and bad data never end the job from here."""
        if self.state is State.STARTING:
            check_log_tree(self.cfg.workers, self.cfg.run_id, self.log)  # a log tree not ours: an error before joining
            if self.spares is not None:  # a --preload that cannot be imported is an error before the job is joined
                self.spares.fill(self._first_envs())
                self.spares.wait_ready()
            self.coord.open(self._session_lost)
            self._set(lease=self.session.lease_id)
            self._enter(State.RENDEZVOUS, f"registered as {self.cfg.node_id} in job {self.keys.gen} of the run "
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
        self._stop_workers("the agent is exiting")
        self.checks.close()
        if self.spares is not None:
            self.spares.close()
        self.coord.close(why)

    def _first_envs(self) -> dict[int, dict[str, str]]:
        """--warm-restart at start: each local rank's worker environment as far as it is known before a round."""
        a = Assignment(run_id=self.cfg.run_id, round=0, group_rank=0, group_world_size=1, rank_offset=0,
                       world_size=self.cfg.workers.nproc, master_addr="", master_port=0, restart_count=0,
                       max_restarts=self.cfg.spec.max_restarts)
        base = worker_base_env()
        return {i: worker_env(self.cfg.workers, a, i, base, "") for i in range(self.cfg.workers.nproc)}

    def _refill_spares(self) -> float | None:
        """--warm-restart: start the spares for the next round once they are due; returns when they are."""
        if self.spares is None or self.spares.due is None:
            return None
        if time.monotonic() < self.spares.due:
            return self.spares.due
        self.spares.fill()
        return None

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
        if isinstance(action, Finish):
            return self._finish(action.result)
        if not isinstance(action, Wait):
            self._act(action, view)
            return None
        self._say_wait(action)
        hang_check = self._check_progress()
        if self.local.outcome == Outcome.FAILED and self.local.failure.hang:
            return None  # decide again: the hung group fails now
        refill = self._refill_spares()
        deadline = min((d for d in (action.deadline, hang_check, refill) if d is not None), default=None)
        self._drain(block=True, deadline=deadline)
        return None

    def _say_wait(self, action: Wait) -> None:
        """What the agent waits for: at INFO when ``observe.wait_note`` says so, DEBUG otherwise."""
        now = time.monotonic()
        said = wait_note(action, self.state is State.RENDEZVOUS, self._wait_said, now)
        if said is not None:
            left = f" (the round times out in {action.timeout_at - now:.0f} s)" if action.timeout_at else ""
            self.log.info("waiting: %s%s", action.why, left)
            self._wait_said = said
        else:
            self.log.debug("waiting: %s", action.why)

    def _drain(self, block: bool, deadline: float | None = None) -> None:
        """Handle queued events; when ``block``, first wait for one (until ``deadline``)."""
        if block:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                self._handle(*self.events.get(timeout=timeout))
            except queue.Empty:
                return
        while True:
            try:
                self._handle(*self.events.get_nowait())
            except queue.Empty:
                return

    def _handle(self, kind: str, item) -> None:
        if kind == "watch":
            self.coord.apply(item)
        elif kind == "worker":
            self._worker_exit(item)
        elif kind == "lost":
            session, why = item
            # A late report from a session already replaced, or already fenced for, is old news.
            if session is self.session and self.state is not State.FENCED:
                self._fence(why)
        elif kind == "health":
            self.checks.health_done(item)
        elif kind == "drained":
            self.checks.drain_done(item, self.where.round)
        elif kind == "leave":  # the owner of an embedded agent (torchrun's backend) ends it
            raise JobStopped(item)
        elif kind == "signal":
            raise JobStopped(f"{self.cfg.node_id} received {signal.Signals(item).name}: stopped its workers and "
                             "left the job")

    def _observe(self, v: View) -> None:
        """Note what the view says (``coord.observe``: first sightings, this agent's round) and log it."""
        self._set(checking=self.checks.checking, draining=self.checks.draining, pending=self.coord.pending)
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

    # --- actions -------------------------------------------------------------------------------------------
    def _act(self, action, view: View) -> None:
        if isinstance(action, CheckHealth):
            self._healthy(action.announce)
            return
        if isinstance(action, Attribute):
            self.coord.attribute(action, view)
            return
        if isinstance(action, JoinRound) and (self.cfg.health.active or self.cfg.quarantine.active) \
                and not self._healthy():
            return  # it does not join; decide() waits until the next check is due
        if isinstance(action, StopWorkers):
            if self.local.outcome == Outcome.FAILED:  # our failure lost the race to another node's bump or end
                self.coord.report_failure(self.local.failure)
            self._stop_workers(action.why)
            if self.state is State.RUNNING and view.result is None:  # a new round: back to rendezvous
                self._enter(State.RENDEZVOUS, action.why)
            return
        if isinstance(action, StartWorkers):
            self._start_workers(action)
            return
        res = self.coord.act(action, view)
        self._settle(res)

    def _healthy(self, announce: bool = False) -> bool:
        """The health gate before a join (``health.py``): a quarantined or unhealthy node says why in its registry
        entry and checks again after a backoff (or when its quarantine ends); it joins once a check passes. The
        check itself runs off the loop (``checks.py``): False until its verdict is in. The first pass ends the
        registry's ``checking``; ``announce`` writes the entry on a pass even when nothing changed there."""
        problem, wait = "", 0.0
        if self.cfg.quarantine.active:
            problem, wait = self.coord.quarantine.holds(self.cfg.quarantine, time.time())
        if not problem and self.cfg.health.active:
            verdict = self.checks.health()
            if verdict is None:
                self._set(checking=True)  # decide() waits for the verdict, which wakes the loop
                return False
            problem = verdict
        if problem:
            self._health_failures += 1
            wait = wait or health.backoff(self._health_failures)
            if problem != self.coord.registry.health:
                self.log.warning("this node is unhealthy and does not join: %s (next check in %.0f s)", problem,
                                 wait)
            self.coord.set_health(problem)
            self._set(unhealthy=problem, health_retry_at=time.monotonic() + wait)
            return False
        if self.coord.registry.health:
            self.log.info("this node passed its health check after %d failed one(s); joining",
                          self._health_failures)
        if announce:
            self.log.info("round %d's scale-up did not take this node in; it is ready and says so again in its "
                          "registry entry", self.where.round)
        self._health_failures = 0
        self.coord.set_health("", announce)
        self._set(unhealthy="", health_retry_at=0.0, ready=True)
        return True

    def _settle(self, res) -> None:
        """After a txn: its own writes are in the mirror already (read back in the txn); after a failed compare,
        re-read what it compared."""
        if not res.succeeded:
            self.coord.resync()

    # --- workers -------------------------------------------------------------------------------------------
    def _start_workers(self, a: StartWorkers) -> None:
        plan, m = a.plan, a.member
        assignment = Assignment(run_id=self.cfg.run_id, round=plan.round, group_rank=m.group_rank,
                                group_world_size=len(plan.members), rank_offset=m.rank_offset,
                                world_size=plan.world_size, master_addr=plan.master_addr,
                                master_port=plan.master_port, restart_count=plan.restart_count,
                                max_restarts=plan.max_restarts, job=self.keys.gen)
        if self.checks.held is not None:  # the last workers' GPU memory was not released in time
            held, self.checks.held = dataclasses.replace(self.checks.held, round=plan.round), None
            self._set(workers_round=plan.round, workers_running=False, outcome=Outcome.FAILED, failure=held)
            return  # decide() counts it as this node's failure in this round
        if self.checks.must_drain(self.group):
            self._set(draining=True)  # the drain runs off the loop; decide() waits for its verdict
            return
        warm = {"spares": self.spares} if self.spares is not None else {}
        self.group = self._group_factory(self.cfg.workers, lambda ex: self.events.put(("worker", ex)),
                                         node_id=self.cfg.node_id,
                                         logger=logs.get("etcd_agent.node.workers", self.where),
                                         **warm)
        self._exits: dict[int, WorkerExit] = {}
        self._set(workers_round=plan.round, workers_running=True, outcome=None, failure=None)
        self.group.start(assignment)
        self._enter(State.RUNNING, f"{self.group.describe(assignment)}, master {plan.master_addr}:"
                    f"{plan.master_port}, restart count {plan.restart_count}")

    def _worker_exit(self, ex: WorkerExit) -> None:
        if self.group is None or ex.round != self.local.workers_round or not self.local.workers_running:
            if self.group is not None and ex.failed and self.group.ended_on_its_own(ex):
                # It failed on its own just before we stopped the group for another reason: keep its report.
                self.coord.report_failure(self.group.failure_report(ex))
            return  # otherwise: an exit of a group we stopped
        self._exits[ex.local_rank] = ex
        if ex.failed and self.local.outcome is None:
            report = self.group.failure_report(ex)
            if report.rank is None:  # the group as a whole (torchrun's agent restarted it)
                self.log.error("%s", describe_failure(report))
            else:
                self.log.error("worker rank %d (pid %d) failed with %s%s", ex.rank, ex.pid, ex.describe(),
                               f": {report.message}" if report.message else "")
            self._set(outcome=Outcome.FAILED, failure=report)
        elif ex.failed:  # the group failed already: this one is reported, once, but it is not the root cause
            self.log.warning("worker rank %d (pid %d) failed too, with %s", ex.rank, ex.pid, ex.describe(),
                             round=ex.round)
        elif len(self._exits) == self.cfg.workers.nproc and self.local.outcome is None:
            self.log.info("all %d local worker(s) finished successfully", self.cfg.workers.nproc)
            self._set(outcome=Outcome.SUCCEEDED, workers_running=False)

    def _check_progress(self) -> float | None:
        """Hang detection: a running worker silent for --worker-timeout fails the group; returns the next check."""
        limit = self.cfg.worker_timeout
        if not limit or not self.local.workers_running or self.local.outcome is not None:
            return None
        silent = self.group.silent_for()
        if not silent:
            return None
        longest, ex = max(silent, key=lambda s: s[0])
        if longest < limit:
            return time.monotonic() + (limit - longest)
        report = dataclasses.replace(self.group.failure_report(ex), exitcode=None, signal=None, hang=True,
                                     message=f"no progress for {longest:.1f} s (--worker-timeout {limit:g}); the "
                                             "worker is considered hung")
        self.log.error("worker rank %d (pid %d) made no progress for %.1f s (--worker-timeout %g)", ex.rank, ex.pid,
                       longest, limit)
        self._set(outcome=Outcome.FAILED, failure=report)
        return None

    def _stop_workers(self, why: str) -> None:
        # Leaving on a --signals-to-handle signal forwards that signal, as torchrun does; otherwise SIGTERM.
        sig = self.signalled or signal.SIGTERM
        if self.group is not None and self.local.workers_running:
            self._set(workers_running=False)
            self.group.stop(why, sig=sig)
        elif self.group is not None:
            self.group.stop(why, sig=sig)  # reaps anything a finished worker left behind

    def _session_lost(self, session: Session, why: str) -> None:
        """On the keepalive thread, the moment the session is declared lost: the main loop may be blocked in an
        etcd call, so the workers are stopped right here, within the fencing margin, before the lease can expire."""
        self.events.put(("lost", (session, why)))
        group = self.group
        if group is not None and session is self.session:
            group.stop(f"self-fencing: {why}", grace=self.coord.timings.fence_grace)

    def _fence(self, why: str) -> None:
        """Our lease is (about to be) gone: stop the workers before peers re-form without us; FENCED rejoins."""
        self._enter(State.FENCED, f"session lost ({why}); stopping workers before the lease can expire")
        if self.local.outcome == Outcome.FAILED:
            try:
                self.coord.report_failure(self.local.failure)
            except EtcdUnavailable:
                self.log.warning("could not record this node's failure report: etcd is unreachable")
        self._stop_workers(f"self-fencing: {why}")
        self._set(outcome=None, failure=None)
        self.coord.drop_session()  # etcd may be unreachable: the stale lease is revoked once it is back

    def _rejoin(self) -> None:
        """FENCED: open a new session (its registration revokes the stale leases first); until --join-timeout."""
        self._drain(block=False)  # a signal still ends the agent
        if self.coord.rejoin(self._session_lost):
            self._set(lease=self.session.lease_id)
            self._enter(State.RENDEZVOUS, f"new session (lease {self.session.lease_id:x}); rejoining")

    def _finish(self, result: Result) -> int:
        self._stop_workers("the job ended")
        self._enter(State.FINISHED, f"job {result.outcome}: {result.reason}")
        if result.outcome == Outcome.SUCCEEDED:
            self.log.info("job succeeded in round %s after %s restart(s)", result.round, result.restarts)
            return 0
        raise job_error(result)(result.ended(self.cfg.run_id))


def install_signal_handlers(agent: Agent, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """``--signals-to-handle`` (torchrun's default SIGTERM, SIGINT, SIGHUP, SIGQUIT): stop the workers with that
    same signal, revoke the lease, exit 128+N (from the main thread's loop)."""
    relay: queue.SimpleQueue = queue.SimpleQueue()

    def shut_down() -> None:
        # Event.set takes a lock the interrupted main thread may hold, so the handler never calls it: this thread,
        # started here and not in the handler (starting a thread there can deadlock too), sets it for the handler.
        while True:
            relay.get()
            agent.shutdown.set()  # etcd retries stop waiting

    threading.Thread(target=shut_down, name="signals", daemon=True).start()

    def handler(signum, _frame):  # only posts: SimpleQueue.put is reentrant, safe in a signal handler
        agent.signalled = signum
        agent.events.put(("signal", signum))
        relay.put(signum)
    for sig in signals:
        signal.signal(sig, handler)
