"""Simulated nodes: the production agent, many per process, with stand-in workers.

Each simulated node is a real ``etcd_agent.agent.Agent`` calling ``run()`` in a thread of its own: its own etcd
client, session lease and keepalive, watch of the job prefix, mirror, ``decide`` and guarded txns, exactly the code
a node runs. Only the workers are replaced: ``StandInGroup`` implements the worker-group contract
(``etcd_agent/node/api.py``) without processes. A simulation runs the production code, never a model of it, and its
agents are configured by the production command line (``JobParams.config``: ``cli.launch.resolve``).

- ``StandInGroup``: ``start(assignment)`` makes ``cfg.nproc`` stand-in workers that run until ``stop()`` ends them
  (exit ``-sig``) or the scenario does (``Hub.end_workers``: exit 0, or any code). One thread per process sees
  every stand-in's exit (a stand-in has no thread of its own: the harness adds no thread per node and round), never
  on the caller's thread, and posts the group's events as ``WorkerGroup`` does (``api.ExitTally``: an exit the
  scenario caused is the stand-in's own, one ``stop`` caused is not); ``stop`` returns once every exit was seen (as
  ``WorkerGroup.stop`` does) and is idempotent. Stand-ins never beat: with ``--worker-timeout`` a running one is
  hung that long after its start.
- ``Hub``: where the stand-in groups of one process report. It records the first start of each node in each round
  (``Start``, with ``time.monotonic()``, which is system-wide on Linux, so times compare across processes) and each
  agent's end, and lets callers wait for "these nodes started workers in round R" under one condition, each wait
  bounded by a timeout (``SimTimeout`` says what was reached).
- ``SimJob``: K agents of one job against a given etcd endpoint: ``start``, ``wait_round``, ``leave`` (the graceful
  leave of the agent's signal handler, ``Agent.leave``: it stops its workers, revokes its lease, ``run`` raises
  JobStopped), ``end_workers``, ``wait_done``, ``close``.

For tests (tests/test_sim.py, test_agent_fsm.py, test_protocol_counts.py) and tools/bench (scale.py through
sim_proc.py); the product never imports it. Imports the package only through its stable surface: ``Agent``, the
command line (``cli.flags``, ``cli.launch``), ``config``, ``logs`` and the worker-group contract (``node.api``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import signal
import threading
import time
from typing import Callable, Iterable

from etcd_agent import logs
from etcd_agent.agent import Agent
from etcd_agent.cli import flags, launch
from etcd_agent.config import AgentConfig, WorkerConfig
from etcd_agent.etcd.waits import quiet_grpc_waits
from etcd_agent.node.api import Assignment, ExitTally, GroupEvent, GroupFailed, WorkerExit
from etcd_agent.schema.values import Failure

log = logs.get("etcd_agent.bench.sim")
_JOIN_WAIT = 2.0  # bounded wait for the exits of stand-ins that were just told to end
ROOT = "/etcd-agent"


class SimTimeout(AssertionError):
    """A bounded wait of the simulation ran out; the message says what was reached."""


@dataclasses.dataclass(frozen=True)
class Start:
    """One node's stand-in workers started for one round."""

    node: str
    round: int
    group_rank: int
    group_world_size: int
    rank_offset: int
    world_size: int
    restart_count: int
    t: float  # time.monotonic() when the agent called start()


@dataclasses.dataclass(frozen=True)
class Done:
    """How one agent's ``run()`` ended: its exit code, or the exception it raised."""

    node: str
    code: int | None
    error: str | None
    t: float


class _StandIn:
    """One stand-in worker: ends once, with a code and a cause ("own": the scenario ended it, "stop": stop() did);
    ``on_end`` hands its exit to the exit thread (``_see_exits``)."""

    def __init__(self, local_rank: int, rank: int, rnd: int, on_end: Callable[["_StandIn"], None]):
        self.local_rank, self.rank, self.round = local_rank, rank, rnd
        self.started = time.time()
        self.ended_at = 0.0
        self.code: int | None = None
        self.cause = ""
        self.exited = threading.Event()
        self._on_end = on_end
        self._lock = threading.Lock()

    def end(self, code: int, cause: str) -> bool:
        with self._lock:
            if self.code is not None:
                return False
            self.code, self.cause = code, cause
        self._on_end(self)
        return True


_exits: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()  # stand-in exits, for ``_see_exits``
_exits_seen = threading.Lock()  # held once its thread runs


def _see_exits() -> None:
    """The one thread of this process that sees stand-in exits, in the order they were ended (started with the
    first stand-in): what a worker's waiter thread is to ``WorkerGroup``, shared by every group."""
    while True:
        try:
            _exits.get()()
        except Exception:  # noqa: BLE001 - one group's bug must not keep every other exit from being seen
            log.exception("a stand-in exit could not be handled")


class StandInGroup:
    """The worker-group contract (``node.api.Group``) without processes (see the module doc)."""

    def __init__(self, cfg: WorkerConfig, post: Callable[[GroupEvent], None], node_id: str = "",
                 logger: logs.Log | None = None, worker_timeout: float = 0.0, spares=None, hub: "Hub | None" = None):
        self.cfg = cfg
        self.node_id = node_id
        self._post = post
        self._log = logger or log
        self._worker_timeout = worker_timeout
        self._hub = hub
        self._lock = threading.Lock()  # serializes start and stop, as in WorkerGroup
        self._tally_lock = threading.Lock()
        self._workers: list[_StandIn] = []
        self._tally: ExitTally | None = None
        self._stopped = threading.Event()  # stop() was called for the current round: its hang check ends
        self._pid = os.getpid()  # the pid a stand-in reports: the process that hosts it
        self.stopped_pids: set[int] = set()  # stand-ins hold no GPU memory
        self.progress_files: tuple[str, ...] = ()  # stand-ins report no steps

    def describe(self, a: Assignment) -> str:
        return f"started {self.cfg.nproc} stand-in worker(s), ranks from {a.rank_offset} of {a.world_size}"

    def start(self, a: Assignment) -> None:
        t = time.monotonic()
        with self._lock:
            if self.running:
                raise RuntimeError(f"round {a.round}: stop() the workers of round {self._workers[0].round} first")
            tally = self._tally = ExitTally(a.round, self.cfg.nproc, self._log)
            self._stopped = threading.Event()
            self._workers = [_StandIn(i, a.rank_offset + i, a.round,
                                      lambda w: _exits.put(functools.partial(self._exited, w, tally)))
                             for i in range(self.cfg.nproc)]
            if _exits_seen.acquire(blocking=False):
                threading.Thread(target=_see_exits, name="stand-in-exits", daemon=True).start()
            if self._worker_timeout:
                threading.Thread(target=self._check_progress, args=(self._tally, self._stopped), daemon=True,
                                 name=f"stand-in-{self.node_id}-r{a.round}-progress").start()
        if self._hub is not None:
            self._hub.started(self, Start(self.node_id, a.round, a.group_rank, a.group_world_size, a.rank_offset,
                                          a.world_size, a.restart_count, t))

    def _exited(self, w: _StandIn, tally: ExitTally) -> None:
        """On the exit thread: ``w`` ended; tally it and post what the group's end says, if it ended now."""
        ex = WorkerExit(w.local_rank, w.rank, self._pid, w.code, time.time(), w.round)
        w.ended_at = ex.time
        w.exited.set()
        with self._tally_lock:
            event = tally.exit(ex, w.cause == "own", lambda: self.failure_report(ex))
        if event is not None:
            self._post(event)

    def _check_progress(self, tally: ExitTally, stopped: threading.Event) -> None:
        """--worker-timeout: stand-ins never beat, so one still running that long after its start is hung."""
        limit = self._worker_timeout
        if stopped.wait(limit):
            return
        live = [w for w in self._workers if not w.exited.is_set()]
        with self._tally_lock:
            if not live or not tally.hung():
                return
        w, now = live[0], time.time()
        self._log.error("worker rank %d (pid %d) made no progress for %.1f s (--worker-timeout %g)", w.rank,
                        self._pid, now - w.started, limit, round=w.round)
        self._post(GroupFailed(w.round, Failure(
            w.rank, w.local_rank, self._pid, None, None, f"no progress for {now - w.started:.1f} s (--worker-timeout "
            f"{limit:g}); the worker is considered hung", time=now, round=w.round, node=self.node_id, hang=True)))

    def end(self, code: int = 0, local_rank: int | None = None) -> int:
        """End the running stand-ins (or the one of ``local_rank``) on their own with ``code`` (the scenario's
        doing); returns how many."""
        return sum(w.end(code, "own") for w in list(self._workers) if local_rank in (None, w.local_rank))

    def stop(self, reason: str = "", grace: float | None = None, sig: int = signal.SIGTERM) -> None:
        with self._lock:
            self._stopped.set()
            workers = list(self._workers)
            for w in workers:
                w.end(-int(sig), "stop")
            deadline = time.monotonic() + _JOIN_WAIT
            for w in workers:
                w.exited.wait(max(0.0, deadline - time.monotonic()))

    def failure_report(self, ex: WorkerExit) -> Failure:
        return Failure(ex.rank, ex.local_rank, ex.pid, ex.returncode, ex.signal_name,
                       f"stand-in worker exited with {ex.describe()}", time=ex.time, round=ex.round, node=self.node_id)

    @property
    def pids(self) -> list[int]:
        return [self._pid for _ in self._workers]

    @property
    def running(self) -> bool:
        return any(not w.exited.is_set() for w in self._workers)


class Hub:
    """What the stand-in groups and agent threads of one process report, and bounded waits on it."""

    def __init__(self, on_start: Callable[[Start], None] | None = None, on_done: Callable[[Done], None] | None = None):
        self._cond = threading.Condition()
        self.starts: dict[int, dict[str, Start]] = {}  # round -> node -> its first start in that round
        self.done: dict[str, Done] = {}
        self._groups: dict[str, StandInGroup] = {}  # node -> its latest group
        self._on_start, self._on_done = on_start, on_done

    def group_factory(self) -> Callable[..., StandInGroup]:
        return functools.partial(StandInGroup, hub=self)

    def started(self, group: StandInGroup, s: Start) -> None:
        with self._cond:
            self._groups[s.node] = group
            self.starts.setdefault(s.round, {}).setdefault(s.node, s)
            self._cond.notify_all()
        if self._on_start is not None:
            self._on_start(s)

    def finished(self, d: Done) -> None:
        with self._cond:
            self.done[d.node] = d
            self._cond.notify_all()
        if self._on_done is not None:
            self._on_done(d)

    def end_workers(self, nodes: Iterable[str] | None = None, code: int = 0) -> int:
        """End the running stand-in workers of ``nodes`` (default: all) with ``code``; returns how many ended."""
        with self._cond:
            groups = [g for n, g in self._groups.items() if nodes is None or n in set(nodes)]
        return sum(g.end(code) for g in groups)

    def wait_for(self, ready: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
        """Wait until ``ready()`` (called under the lock) holds; SimTimeout with ``what()`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SimTimeout(f"not within {timeout:g} s: {what()}")
                self._cond.wait(left)

    def wait_round(self, rnd: int, nodes: Iterable[str], timeout: float) -> dict[str, Start]:
        """Wait until every node in ``nodes`` started workers in round ``rnd``; their starts."""
        nodes = list(nodes)

        def what() -> str:
            have = self.starts.get(rnd, {})
            missing = [n for n in nodes if n not in have]
            latest = max(self.starts, default=0)
            return (f"{len(nodes) - len(missing)} of {len(nodes)} node(s) started workers in round {rnd} (missing "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; latest round seen {latest})")

        self.wait_for(lambda: all(n in self.starts.get(rnd, {}) for n in nodes), timeout, what)
        with self._cond:
            return {n: self.starts[rnd][n] for n in nodes}

    def wait_done(self, nodes: Iterable[str], timeout: float) -> dict[str, Done]:
        nodes = list(nodes)
        self.wait_for(lambda: all(n in self.done for n in nodes), timeout,
                      lambda: f"{sum(n in self.done for n in nodes)} of {len(nodes)} agent(s) returned")
        with self._cond:
            return {n: self.done[n] for n in nodes}


@dataclasses.dataclass(frozen=True)
class JobParams:
    """What every simulated agent of one job is started with (the flags of ``etcd-agent``)."""

    endpoint: str
    run_id: str
    min_nodes: int
    max_nodes: int
    lease_ttl: int = 5
    last_call: float = 1.0
    join_timeout: float = 300.0
    scale_settle: float = 1.0
    max_restarts: int = 100
    nproc: int = 1
    stop_timeout: float = 1.0
    etcd_timeout: float = 10.0  # --etcd-timeout: how long a call keeps retrying (the first contact included)
    root: str = ROOT

    def argv(self, node: str) -> list[str]:
        """The command line of the simulated agent ``node`` (``true`` stands for the training script)."""
        return ["--etcd-endpoints", self.endpoint, "--rdzv-id", self.run_id, "--node-id", node,
                "--nnodes", f"{self.min_nodes}:{self.max_nodes}", "--nproc-per-node", str(self.nproc),
                "--max-restarts", str(self.max_restarts), "--etcd-prefix", self.root, "--local-addr", "127.0.0.1",
                "--lease-ttl", str(self.lease_ttl), "--last-call", repr(self.last_call),
                "--join-timeout", repr(self.join_timeout), "--scale-settle", repr(self.scale_settle),
                "--stop-timeout", repr(self.stop_timeout), "--etcd-timeout", repr(self.etcd_timeout),
                "--no-python", "true"]

    def config(self, node: str) -> AgentConfig:
        """The AgentConfig that ``etcd-agent`` resolves from ``argv(node)`` (``cli.launch.resolve``: the same
        defaults and derived timings as a real agent's)."""
        parser = _parser()
        return launch.resolve(parser, parser.parse_args(self.argv(node))).cfg


@functools.lru_cache(maxsize=1)
def run_in_thread(agent: Agent, name: str = "agent") -> tuple[threading.Thread, dict]:
    """Run ``agent`` on a thread of its own (in-process tests): the thread, and a dict that gets ``code`` (what
    ``run`` returned) or ``error`` (the exception it raised) when the agent ends."""
    outcome: dict = {}

    def body() -> None:
        try:
            outcome["code"] = agent.run()
        except Exception as exc:  # noqa: BLE001 - the caller inspects how the job ended
            outcome["error"] = exc
    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    return thread, outcome


def _parser():
    return flags.build_parser("sim")


class SimJob:
    """Agents of one job in threads of this process, with stand-in workers reporting to ``hub``."""

    def __init__(self, params: JobParams, hub: Hub | None = None):
        self.params = params
        self.hub = hub or Hub()
        self.agents: dict[str, Agent] = {}
        self.threads: dict[str, threading.Thread] = {}

    def start(self, nodes: Iterable[str]) -> tuple[float, float]:
        """Make the agents, then start one thread per agent calling ``run()``; (first, last) start time."""
        quiet_grpc_waits()  # the gRPC waits of an agent's process (``cli.main.run_agent``)
        made = [(n, Agent(self.params.config(n), "sim", group_factory=self.hub.group_factory())) for n in nodes]
        first = time.monotonic()
        for node, agent in made:
            self.agents[node] = agent
            self.threads[node] = t = threading.Thread(target=self._run, args=(node, agent), daemon=True,
                                                      name=f"agent-{node}")
            t.start()
        return first, time.monotonic()

    def _run(self, node: str, agent: Agent) -> None:
        try:
            code, error = agent.run(), None
        except BaseException as exc:  # noqa: BLE001 - JobStopped/JobFailed and any bug: the scenario reads it
            code, error = None, f"{type(exc).__name__}: {exc}"
        self.hub.finished(Done(node, code, error, time.monotonic()))

    def lease_of(self, node: str) -> int:
        session = self.agents[node].session
        return session.lease_id if session is not None else 0

    def leave(self, node: str) -> float:
        """The graceful leave of the agent's signal handler (``Agent.leave``, SIGTERM); returns when it was asked
        to leave."""
        t = time.monotonic()
        self.agents[node].leave(signal.SIGTERM)
        return t

    def wait_round(self, rnd: int, nodes: Iterable[str] | None = None, timeout: float = 60.0) -> dict[str, Start]:
        return self.hub.wait_round(rnd, self.agents if nodes is None else nodes, timeout)

    def end_workers(self, nodes: Iterable[str] | None = None, code: int = 0) -> int:
        return self.hub.end_workers(nodes, code)

    def wait_done(self, nodes: Iterable[str] | None = None, timeout: float = 60.0) -> dict[str, Done]:
        return self.hub.wait_done(self.agents if nodes is None else nodes, timeout)

    def close(self, timeout: float = 30.0) -> list[str]:
        """Leave with every agent still running and join the threads (bounded); returns those still alive."""
        for node, t in self.threads.items():
            if t.is_alive():
                self.leave(node)
        deadline = time.monotonic() + timeout
        for t in self.threads.values():
            t.join(max(0.0, deadline - time.monotonic()))
        return [n for n, t in self.threads.items() if t.is_alive()]

    def __enter__(self) -> "SimJob":
        return self

    def __exit__(self, *exc) -> None:
        left = self.close()
        if left:
            log.error("simulated agents still running after close: %s", ", ".join(left))
