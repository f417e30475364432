"""Launcher processes for the benchmark: build etcd-agent and torchrun command lines, start them, wait with deadlines.

Four kinds of launcher: ``etcd-agent`` (python -m etcd_agent), ``etcd-agent-warm`` (the same with
``--warm-restart``), ``torchrun`` (torch's c10d rendezvous backend, the
first launcher hosting the store) and ``torchrun-etcd-v3`` (torchrun with etcd-agent's ``etcd-v3`` backend, against
the benchmark's etcd). Both torchrun kinds use the backends' defaults; nothing is tuned.

Every launcher runs in its own session with its output in a log file. ``Launcher.kill_tree`` SIGKILLs the launcher,
its process group and every descendant found before the kill (etcd-agent puts each worker in its own group), so a
hung or failed repetition leaves nothing behind. The etcd-agent command line, the exit wait (a pidfd, with the exit's
wall time) and the record reader are the tests' own (``etcd_agent.testing``); waits for records wake on the
records directory's changes (inotify). Imports the standard library, psutil and ``etcd_agent.testing``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from etcd_agent.testing import records as record_files
from etcd_agent.testing.procs import Reaper, agent_command, kill_tree

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "worker.py")
DDP_WORKER = str(HERE / "ddp_worker.py")  # a real torch DDP training loop (gloo): the warm-restart scenarios
POLL_S = 0.02  # for what has no event: memory samples of a running launcher


class RepFailed(Exception):
    """One repetition did not complete (timeout, non-zero exit, missing records); carries the reason."""


def python() -> str:
    return sys.executable


def torchrun_cmd() -> list[str]:
    script = Path(sys.executable).parent / "torchrun"
    return [str(script)] if script.exists() else [python(), "-m", "torch.distributed.run"]


@dataclass
class Job:
    """What one repetition runs: N launchers of one kind with the same worker arguments."""
    kind: str  # "etcd-agent", "torchrun" (c10d) or "torchrun-etcd-v3"
    nnodes: str  # "N" or "MIN:MAX"
    count: int  # launcher processes to start
    nproc: int
    max_restarts: int
    run_id: str
    worker_args: list[str]
    endpoint: str = ""  # etcd endpoint (etcd-agent, torchrun-etcd-v3) or 127.0.0.1:PORT (torchrun's c10d store)
    extra: list[str] = field(default_factory=list)
    spares: int = 0  # etcd-agent: the last ``spares`` launchers run with --spare (torchrun has no such flag)
    worker: str = WORKER  # the script every worker runs

    def command(self, i: int) -> list[str]:
        wargs = [self.worker, *self.worker_args]
        if self.kind in ("etcd-agent", "etcd-agent-warm"):
            spare = ["--spare"] if i >= self.count - self.spares else []
            warm = ["--warm-restart"] if self.kind == "etcd-agent-warm" else []
            return agent_command(self.endpoint, self.run_id, f"node-{i}", self.nnodes, self.nproc,
                                 ["--max-restarts", str(self.max_restarts), *self.extra, *spare, *warm], wargs)
        if self.kind == "torchrun-etcd-v3":  # node_id only names the node in etcd and the logs; no timing knob
            return [*torchrun_cmd(), "--nnodes", self.nnodes, "--nproc-per-node", str(self.nproc),
                    "--rdzv-backend", "etcd-v3", "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.run_id,
                    "--rdzv-conf", f"node_id=node-{i}", "--local-addr", "127.0.0.1",
                    "--max-restarts", str(self.max_restarts), *self.extra, *wargs]
        host = "true" if i == 0 else "false"  # the first torchrun hosts the c10d store
        return [*torchrun_cmd(), "--nnodes", self.nnodes, "--nproc-per-node", str(self.nproc),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.run_id,
                "--rdzv-conf", f"is_host={host}", "--max-restarts", str(self.max_restarts), *self.extra, *wargs]


class Launcher:
    """One launcher process (a "node"), started in its own session, output to ``log``."""

    def __init__(self, cmd: list[str], log: Path, name: str):
        self.name, self.log_path, self.cmd = name, log, cmd
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "wb")
        self.t_start = time.time()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._reaper = Reaper(self.proc, name)
        self._exited = self._reaper.ended

    pid = property(lambda self: self.proc.pid)
    t_exit = property(lambda self: self._reaper.ended_at)  # the exit's wall time, to within a thread wake-up

    def poll(self) -> int | None:
        return self.proc.returncode if self._exited.is_set() else None

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def kill_tree(self, procs: list[psutil.Process] | None = None) -> None:
        """SIGKILL the launcher, its group and its descendants (``procs``: found earlier, e.g. before a kill)."""
        kill_tree(None if self._exited.is_set() else self.pid, procs or [])
        self._exited.wait()
        self._log.close()

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def start_all(job: Job, logdir: Path) -> list[Launcher]:
    return [Launcher(job.command(i), logdir / f"{job.kind}-node-{i}.log", f"node-{i}") for i in range(job.count)]


def wait_exit(launchers: list[Launcher], deadline: float) -> None:
    """Wait until every launcher exited; RepFailed on the deadline or on a non-zero exit code."""
    for la in launchers:
        la._exited.wait(max(0.0, deadline - time.monotonic()))
    codes = [la.poll() for la in launchers]
    running = [la.name for la, c in zip(launchers, codes) if c is None]
    if running:
        raise RepFailed(f"launchers still running at the deadline: {', '.join(running)}")
    bad = [f"{la.name} exited {c}" for la, c in zip(launchers, codes) if c != 0]
    if bad:
        raise RepFailed("; ".join(bad))


def cleanup(launchers: list[Launcher]) -> None:
    for la in launchers:
        la.kill_tree()


records = record_files.load  # every record the workers wrote (worker.py writes them whole: a rename)


def generation(recs: list[dict], world: int, where: Callable[[dict], bool]) -> list[dict] | None:
    """The first record per rank of a ``world``-sized generation matching ``where``, once all ranks are there."""
    by_rank: dict[int, dict] = {}
    for r in sorted(recs, key=lambda r: r["t_start"]):
        if r["world_size"] == world and where(r):
            by_rank.setdefault(r["rank"], r)
    return [by_rank[i] for i in range(world)] if set(by_rank) == set(range(world)) else None


def wait_generation(out: Path, world: int, launchers: list[Launcher], deadline: float,
                    where: Callable[[dict], bool], what: str) -> list[dict]:
    """Wait until all ``world`` ranks matching ``where`` recorded; RepFailed at the deadline or if launchers end.
    Woken by each record written to ``out`` and by each launcher's exit, not by a polling period."""
    def check() -> list[dict] | None:
        gen = generation(records(out), world, where)
        if gen:
            return gen
        codes = [la.proc.poll() for la in launchers]
        if any(c not in (None, 0) for c in codes) or all(c is not None for c in codes):
            gen = generation(records(out), world, where)  # the last workers may have recorded meanwhile
            if gen:
                return gen
            exited = [f"{la.name} exited {c}" for la, c in zip(launchers, codes) if c is not None]
            raise RepFailed(f"before all {world} workers of {what} started: {'; '.join(exited)}")
        return None
    try:
        return record_files.wait_until(check, max(0.0, deadline - time.monotonic()), what, out,
                                       pids=[la.pid for la in launchers])
    except AssertionError:
        raise RepFailed(f"not all {world} workers of {what} started by the deadline") from None
