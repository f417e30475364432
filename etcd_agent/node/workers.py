"""This node's worker processes for one round: spawn, watch, stop. The ``node.api.Group`` contract, with processes.

Guarantees:

- Every worker gets ``env.worker_env`` (torchrun 2.13's environment) plus ``ETCD_AGENT_PROGRESS_FILE``, its
  heartbeat file (``progress.py``). Its output goes where torchrun sends it (``worker_logs``); stderr is always also
  kept in ``stderr.log`` for the failure report.
- Every worker runs in its own process group with ``PR_SET_PDEATHSIG = SIGKILL`` (``spawn``), so it cannot outlive
  the agent. The kernel sends that signal when the *thread* that forked the child exits, not the process: ``start``
  must be called from a thread that lives as long as the workers (the agent's main thread).
- An exit is seen the moment it happens: one waiter thread per worker blocks in ``Popen.wait`` and turns it into
  the contract's events (``api.ExitTally``): ``GroupSucceeded``, or ``GroupFailed`` with the report of the first
  failure of its own (one that ended before a stop signalled it). ``on_exit`` (optional: tests, tools) hears every
  ``WorkerExit`` once, also of the workers ``stop`` ended. Callbacks run on waiter threads: they must return at
  once and never call ``start`` or ``stop``. A worker that cannot be spawned exits 127 (126: not executable).
- ``--worker-timeout``: a thread of the group watches the heartbeats while the round runs; a worker silent that long
  fails the group (``GroupFailed``, ``hang=True``) unless it failed already.
- ``start`` and ``stop`` hold one lock; never call them from a signal handler. ``stop`` is idempotent: SIGTERM to
  every group, grace until an absolute deadline, SIGKILL, then every descendant found by psutil (collected before
  the first signal, plus the group members) is killed and waited for.
- With ``--warm-restart`` (``warm.py``, ``handoff.py``) a worker starts from its local rank's pre-started
  interpreter when that one is usable, cold otherwise, with the same environment, command line, streams, process
  group, priority, parent-death signal, waiter, stop, reports and progress file either way.
- A log directory that cannot be written, a log tree not the agent's (``logtree``), or a virtual local rank beyond
  ``CUDA_VISIBLE_DEVICES`` is a ConfigError from ``start`` before any worker runs.

Must not import torch, etcd3 or any package module but ``config``, ``errors``, ``logs``, ``progress``,
``proctree``, ``metrics``, ``secure``, ``schema.values`` and ``node/``; never ``etcd/``, ``coord/`` or the agent.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

from .. import metrics, proctree
from ..config import WorkerConfig, worker_base_env
from ..logs import Log, Where, get as get_logger
from ..progress import PROGRESS_ENV, last_progress
from ..schema.values import Failure
from . import handoff, reports, spawn
from .api import Assignment, ExitTally, GroupEvent, GroupFailed, WorkerExit
from .env import log_root, worker_env
from .warm import Spare, SparePool
from .worker_logs import PREFIX_TEMPLATE_ENV, WorkerLogs, plan_logs, prepare_all

log = get_logger("etcd_agent.node.workers")

_THREAD_PREFIX = "etcd-agent-workers-"  # every thread this module starts; start() refuses to run on one
_KILL_WAIT = 10.0  # how long a SIGKILLed process may take to vanish (D state) before we give up and say so
_JOIN_WAIT = 2.0  # bounded join of threads that should already be done


@dataclass
class _Worker:
    """One spawned (or failed to spawn) worker of the current round."""

    local_rank: int
    rank: int
    round: int
    logs: WorkerLogs
    proc: subprocess.Popen | None = None
    ps: psutil.Process | None = None  # taken right after spawn: signals through it are safe from pid reuse
    exited: threading.Event = field(default_factory=threading.Event)
    waiter: threading.Thread | None = None
    progress_file: str = ""  # $ETCD_AGENT_PROGRESS_FILE: the worker's heartbeat (see progress.py)
    ended_before_stop: bool = False  # it had exited when stop() sent its first signal
    ended_at: float = 0.0  # wall time its exit was seen (0 while it runs; proctree's pid-reuse guard reads it)
    started: float = 0.0  # wall time of the spawn
    importing: Spare | None = None  # the warm spare it was handed to while that one still imported --preload

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0


class GroupState(enum.Enum):
    """Where a worker group is; ``WorkerGroup._to`` is the one place that moves it."""

    IDLE = "idle"  # nothing started yet
    RUNNING = "running"  # started; workers may exit on their own (a success or a failure)
    STOPPING = "stopping"  # stop() signalled the workers and waits for them: their exits are expected
    STOPPED = "stopped"  # every worker and descendant of the round is gone


_MOVES = {GroupState.IDLE: {GroupState.RUNNING}, GroupState.RUNNING: {GroupState.STOPPING},
          GroupState.STOPPING: {GroupState.STOPPED}, GroupState.STOPPED: {GroupState.RUNNING}}
_STOP_SLICE = 0.05  # seconds a stop waits between looks at its deadline (fencing may bring it forward)


def _workers(n: int) -> str:
    return f"{n} worker{'' if n == 1 else 's'}"


class WorkerGroup:
    """The workers of this node; one round at a time. Its state is a ``GroupState``; a stop has one absolute
    deadline (the SIGKILL moment), which a later, more urgent stop (self-fencing) brings forward even while the first
    one is still waiting for the workers."""

    def __init__(self, cfg: WorkerConfig, post: Callable[[GroupEvent], None] | None = None, node_id: str = "",
                 logger: Log | None = None, spares: SparePool | None = None, worker_timeout: float = 0.0,
                 on_exit: Callable[[WorkerExit], None] | None = None):
        """``post`` takes the group's events; ``spares`` (``--warm-restart``): workers start from its pre-started
        interpreters where it has a usable one, cold otherwise; ``worker_timeout`` (``--worker-timeout``, 0: off):
        a worker silent that long fails the group; ``on_exit`` hears every worker's exit."""
        self.cfg = cfg
        self.node_id = node_id
        self._post = post
        self._on_exit = on_exit
        self._log = logger or log
        self._spares = spares
        self._worker_timeout = worker_timeout
        self._lock = threading.Lock()  # serializes start and stop
        self._state_lock = threading.Lock()  # the state, and which exits ended before a stop (short, never waits)
        self._tally_lock = threading.Lock()  # the round's exits (a report is made under it: never taken by stop)
        self._workers: list[_Worker] = []
        self._tally: ExitTally | None = None  # the current round's exits
        self._awake = threading.Event()  # set by stop: the hang check of the round ends
        self._reports: dict[tuple[int, int], WorkerLogs] = {}  # (round, local_rank) -> logs, for failure_report
        self._log_root = cfg.log_dir
        self._warm = ""  # how many of the round's workers started warm, for ``describe``
        self.stopped_pids: set[int] = set()  # the workers and descendants the last stop ended (GPU memory drain)
        self.progress_files: tuple[str, ...] = ()  # the round's workers' progress files (``node.steps`` reads them)
        self.state = GroupState.IDLE
        self._deadline_lock = threading.Lock()
        self._stop_deadline: float | None = None  # monotonic: SIGKILL for what is left of the round being stopped

    def describe(self, a: Assignment) -> str:
        """What ``start(a)`` ran, for the agent's log: ``started 2 workers (ranks 0-1 of 4, pids 17 18)``."""
        n, lo = self.cfg.nproc, a.rank_offset
        ranks = f"rank {lo}" if n == 1 else f"ranks {lo}-{lo + n - 1}"
        return f"started {_workers(n)} ({ranks} of {a.world_size}, pids {' '.join(map(str, self.pids))}{self._warm})"

    def start(self, a: Assignment) -> None:
        """Spawn ``cfg.nproc`` workers for round ``a.round``. Call from the agent's main thread (see module doc)."""
        if threading.current_thread().name.startswith(_THREAD_PREFIX):
            raise RuntimeError("WorkerGroup.start was called from a worker waiter thread; the parent-death "
                               "signal would kill the workers when that thread ends")
        if self._log.where is None:  # not an agent's group: its lines still say run, node and round
            self._log = self._log.bound(Where(a.run_id, self.node_id or "-"))
        if threading.current_thread() is not threading.main_thread():
            self._log.warning("workers are started from thread %s; they get SIGKILL when it ends",
                              threading.current_thread().name, round=a.round)
        with self._lock:
            if self.running:
                raise RuntimeError(f"round {a.round}: stop() the workers of round {self._workers[0].round} first")
            base = worker_base_env()
            self._log_root = self._log_root or log_root(self.cfg, self._log)
            logs = plan_logs(self.cfg, self._log_root, a.run_id, self.node_id, a.round, a.rank_offset,
                             base.get(PREFIX_TEMPLATE_ENV), job=a.job)
            workers = [_Worker(i, a.rank_offset + i, a.round, item) for i, item in enumerate(logs)]
            envs = [worker_env(self.cfg, a, w.local_rank, base, w.logs.error_file) for w in workers]
            streams = prepare_all(logs)  # all or none, before anything runs
            self._workers = []
            self._tally = ExitTally(a.round, len(workers), self._log)
            self._awake = threading.Event()
            self._to(GroupState.RUNNING)
            warm, cold = 0, []
            try:
                for w, env, stream_kwargs in zip(workers, envs, streams):
                    self._reports[(a.round, w.local_rank)] = w.logs
                    env[PROGRESS_ENV] = w.progress_file = os.path.join(w.logs.directory, "progress")
                    spare = self._spares.take(w.local_rank, env) if self._spares is not None else None
                    w.started = time.time()
                    if spare is None or not self._hand(w, spare, env, stream_kwargs):
                        if self._spawn(w, env, stream_kwargs):
                            cold.append(w)
                    else:
                        warm += 1
                    self._workers.append(w)
            finally:  # threads once every worker runs (the last one is not kept waiting for them), whatever happened
                for spawned in cold:
                    self._running(spawned)
            self._warm = f", {warm} of them warm" if self._spares is not None else ""
            metrics.track_workers(lambda: [(w.progress_file, w.started, w.exited.is_set()) for w in workers])
            self.progress_files = tuple(w.progress_file for w in workers)
            self._log.debug("started %d workers (ranks %d-%d, pids %s%s); logs in %s", len(self._workers),
                            a.rank_offset, w.rank, self.pids, self._warm, os.path.dirname(w.logs.directory),
                            round=a.round)
            if self._worker_timeout:
                threading.Thread(target=self._check_progress, args=(self._tally, self._awake), daemon=True,
                                 name=f"{_THREAD_PREFIX}progress-r{a.round}").start()

    def _spawn(self, w: _Worker, env: dict[str, str], streams: dict) -> bool:
        """Start ``w``'s process (True), else report it failed from a thread (on_exit never runs inside start)."""
        argv = self.cfg.command()
        try:
            w.proc = spawn.popen_orphan_proof(argv, env=env, stdin=subprocess.DEVNULL, **streams)
            return True
        except OSError as exc:
            self._log.error("could not start worker rank %d (%s): %s", w.rank, argv[0], exc, round=w.round)
            w.logs.spawn_failed(f"etcd-agent could not start {argv[0]!r} for rank {w.rank}: {exc}")
            code = 127 if isinstance(exc, FileNotFoundError) else 126 if isinstance(exc, PermissionError) else 1
        self._watch(w, self._report, (w, code))
        return False

    def _hand(self, w: _Worker, spare: Spare, env: dict[str, str], streams: dict) -> bool:
        """Start ``w`` from a warm spare (``handoff``). False when the spare could not take it (it is killed; start
        cold)."""
        try:
            readers = handoff.hand(spare, self.cfg, env, streams, self._spares.cold_after)  # type: ignore[union-attr]
        except OSError as exc:
            self._log.warning("could not hand rank %d to its warm spare (pid %d): %s; starting it cold", w.rank,
                              spare.pid, exc, round=w.round)
            return False
        w.proc = spare.proc
        w.proc.stdout, w.proc.stderr = readers.get("stdout"), readers.get("stderr")
        w.importing = None if spare.said else spare  # its waiter hears whether it finished in time
        self._running(w)
        if w.local_rank == self.cfg.nproc - 1 and self._spares is not None:
            self._spares.fill_due()  # the next round's idle spares start now, before a crash can be handled
        return True

    def _running(self, w: _Worker) -> None:
        """A worker process exists: its output pumps, its psutil handle, its waiter."""
        w.logs.attach(w.proc)
        try:
            w.ps = psutil.Process(w.proc.pid)
        except psutil.Error:
            w.ps = None  # already gone; its waiter reports it
        self._watch(w, self._wait, (w,))

    def _watch(self, w: _Worker, target: Callable, args: tuple) -> None:
        w.waiter = threading.Thread(target=target, args=args, daemon=True, name=f"{_THREAD_PREFIX}wait-rank{w.rank}")
        w.waiter.start()

    def _wait(self, w: _Worker) -> None:
        if w.importing is not None:
            limit = self._spares.cold_after if self._spares is not None else 0.0
            handoff.say_how_it_started(w.importing, limit, self._log, w.rank, w.pid, w.round)
        self._report(w, w.proc.wait())  # type: ignore[union-attr]  (only started with a process)

    def _report(self, w: _Worker, returncode: int) -> None:
        """On the worker's waiter: its exit, and the group's event it makes (``api.ExitTally``)."""
        ex = WorkerExit(w.local_rank, w.rank, w.pid, returncode, time.time(), w.round)
        w.ended_at = ex.time
        w.exited.set()
        with self._state_lock:  # a stop marks what ended before its first signal under this lock
            own = self.state is GroupState.RUNNING or w.ended_before_stop
            stopping = self.state is GroupState.STOPPING
        # A failure is the agent's to report (once, with the worker's error); an exit 0, or one a stop caused, is no
        # news: here each is a detail.
        self._log.debug("worker rank %d (local rank %d, pid %d) exited with %s%s", ex.rank, ex.local_rank, ex.pid,
                        ex.describe(), " (while stopping)" if stopping else "", round=w.round)
        self._call(self._on_exit, ex, w)
        with self._tally_lock:
            tally = self._tally if self._tally is not None and self._tally.round == w.round else None
            event = tally.exit(ex, own, lambda: self.failure_report(ex)) if tally is not None else None
        if event is not None:
            self._call(self._post, event, w)

    def _call(self, callback: Callable | None, item, w: _Worker) -> None:
        if callback is None:
            return
        try:
            callback(item)
        except Exception:  # noqa: BLE001 - a broken callback must not hide later exits
            what = "exit" if isinstance(item, WorkerExit) else "event"
            self._log.exception("the %s callback failed for worker rank %d", what, w.rank, round=w.round)

    def _check_progress(self, tally: ExitTally, awake: threading.Event) -> None:
        """--worker-timeout, on a thread of its own while the round runs: a running worker silent that long fails
        the group (``GroupFailed``, hang=True), unless the group failed already or a stop ended the round."""
        limit = self._worker_timeout
        while True:
            with self._state_lock:
                if self.state is not GroupState.RUNNING or tally is not self._tally:
                    return
                now = time.time()
                silent = [(now - last_progress(w.progress_file, w.started), w) for w in self._workers
                          if w.proc and not w.exited.is_set()]
            if not silent:
                return
            longest, w = max(silent, key=lambda s: s[0])
            if longest >= limit:
                break
            awake.wait(limit - longest)
        with self._tally_lock:
            if not tally.hung():
                return  # it failed already: that failure is the round's
        report = reports.hang_report(self._reports.get((w.round, w.local_rank)), w.rank, w.local_rank, w.pid,
                                     w.round, longest, limit, now, self.node_id)
        self._log.error("worker rank %d (pid %d) made no progress for %.1f s (--worker-timeout %g)", w.rank, w.pid,
                        longest, limit, round=w.round, event="worker_failed")
        self._call(self._post, GroupFailed(w.round, report), w)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.proc]

    @property
    def running(self) -> bool:
        return any(not w.exited.is_set() for w in self._workers)

    def _to(self, new: GroupState) -> None:
        with self._state_lock:
            self._move(new)

    def _move(self, new: GroupState) -> None:
        """The one place that moves the state; under ``_state_lock``."""
        if new not in _MOVES[self.state]:
            raise RuntimeError(f"worker group {self.state.value} -> {new.value} is not allowed")
        self.state = new

    def stop(self, reason: str = "", grace: float | None = None, sig: int = signal.SIGTERM) -> None:
        """``sig`` (SIGTERM, or the signal the agent got from ``--signals-to-handle``), grace until
        ``cfg.stop_timeout`` (or the shorter ``grace``), SIGKILL, kill surviving descendants; idempotent and safe
        from any thread but a waiter's. A call while another stop waits brings that stop's SIGKILL forward to its
        own deadline, then returns when the group is stopped."""
        limit = self.cfg.stop_timeout if grace is None else min(grace, self.cfg.stop_timeout)
        with self._deadline_lock:
            mine = time.monotonic() + limit
            if self._stop_deadline is None or mine < self._stop_deadline:
                self._stop_deadline = mine
        try:
            self._stop(reason, sig)
        finally:
            with self._deadline_lock:
                if not self._lock.locked():
                    self._stop_deadline = None

    def _left(self) -> float:
        """Seconds until the current stop's SIGKILL."""
        with self._deadline_lock:
            return (self._stop_deadline or 0.0) - time.monotonic()

    def _stop(self, reason: str, sig: int) -> None:
        with self._lock:
            workers = list(self._workers)
            if self.state is not GroupState.RUNNING:
                self._join(workers)
                return
            rnd = workers[0].round
            tree = proctree.descendants(workers)  # before any signal: afterwards orphans are harder to find
            live = [w for w in workers if not w.exited.is_set()]
            with self._state_lock:  # what ended before this point ended on its own (its failure is the group's)
                self._move(GroupState.STOPPING)
                for w in workers:
                    w.ended_before_stop = w.exited.is_set() or proctree.is_zombie(w.ps)
            self._awake.set()
            self._log.log(logging.INFO if live or tree else logging.DEBUG, "stopping %s with %s: %s",
                          _workers(len(live)) + (f" and {len(tree)} descendant(s)" if tree else ""),
                          proctree.signal_name(sig), reason or "no reason given", round=rnd)
            proctree.signal_all(workers, tree, signal.Signals(sig))
            waiting = [w for w in live if not w.exited.is_set()]
            while waiting and self._left() > 0:
                waiting[0].exited.wait(min(_STOP_SLICE, self._left()))
                waiting = [w for w in waiting if not w.exited.is_set()]
            survivors = list(tree.values())
            while survivors and self._left() > 0:
                survivors = proctree.wait_gone(survivors, time.monotonic() + min(_STOP_SLICE, self._left()))
            self._kill(workers, rnd, survivors)
            self.stopped_pids = {w.pid for w in workers if w.pid} | set(tree)
            self._to(GroupState.STOPPED)
            self._join(workers)

    def _kill(self, workers: list[_Worker], rnd: int, survivors: list[psutil.Process]) -> None:
        """SIGKILL whatever is left of the round: workers, their groups, every descendant found."""
        live = [w for w in workers if not w.exited.is_set()]
        tree = proctree.descendants(workers)
        tree.update((p.pid, p) for p in survivors)
        if live or tree:
            self._log.warning("%d workers (ranks %s) and %d descendants outlived the %.1fs grace; sending SIGKILL",
                              len(live), [w.rank for w in live], len(tree), self.cfg.stop_timeout, round=rnd)
        proctree.signal_all(workers, tree, signal.SIGKILL)
        deadline = time.monotonic() + _KILL_WAIT
        for w in live:
            w.exited.wait(max(0.0, deadline - time.monotonic()))
        left = proctree.wait_gone(list(tree.values()), deadline) + [w.ps for w in workers
                                                            if w.ps and not w.exited.is_set()]
        if left:
            self._log.error("%d processes (pids %s) are still alive %.0fs after SIGKILL",
                            len(left), [p.pid for p in left], _KILL_WAIT, round=rnd)
        else:  # news only after a SIGKILL
            self._log.log(logging.INFO if live or tree else logging.DEBUG, "all workers and their descendants are gone",
                          round=rnd)

    def _join(self, workers: list[_Worker]) -> None:
        me, deadline = threading.current_thread(), time.monotonic() + _JOIN_WAIT
        for w in workers:
            if w.waiter is not None and w.waiter is not me:
                w.waiter.join(max(0.0, deadline - time.monotonic()))
            if not w.logs.join(max(0.0, deadline - time.monotonic())):
                self._log.warning("the output of worker rank %d is still open (a process outside "
                                  "its tree holds it); its log may be incomplete", w.rank, round=w.round)

    def failure_report(self, ex: WorkerExit) -> Failure:
        """What an operator needs about one exit (``reports``); JSON-able, never raises on bad files."""
        return reports.exit_report(self._reports.get((ex.round, ex.local_rank)), ex, self.node_id)
