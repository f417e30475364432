"""The benchmark scenarios, one function each, in a registry the runner iterates.

A scenario function takes a ``Rep`` (which launcher, where to write, the endpoint to use) and returns
``{metric: value}`` for that one repetition, or raises ``RepFailed``. It must leave no process behind: every
launcher it starts is killed in a ``finally``. Metric names carry their unit (``[s]``, ``[MiB]``).
To add a scenario (SIGSTOP or SIGTERM of a launcher, scale-up), write a function and ``register`` it.

Each scenario compares two launcher kinds, its ``kinds`` pair (base, other): the report's ratio is other/base. Most
compare etcd-agent with torchrun (c10d); the torchrun-backend group compares torchrun's two rendezvous backends,
etcd-v3 (base) and c10d, with the same torchrun, the same worker and the same nnodes, nothing tuned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from procs import DDP_WORKER, POLL_S, Job, RepFailed, cleanup, python, records, start_all, wait_exit, wait_generation

KINDS = ("etcd-agent", "torchrun", "torchrun-etcd-v3", "etcd-agent-warm")  # torchrun: torch's c10d backend
ETCD_KINDS = ("etcd-agent", "torchrun-etcd-v3", "etcd-agent-warm")  # the kinds that use the benchmark's private etcd
AGENT_VS_TORCHRUN = ("etcd-agent", "torchrun")  # the default pair
WARM_COLD_TORCHRUN = ("etcd-agent-warm", "etcd-agent", "torchrun")  # warm-restart: ratios cold/warm, torchrun/warm
ETCD_V3_VS_C10D = ("torchrun-etcd-v3", "torchrun")  # torchrun-backend: ratio c10d/etcd-v3
FIRST = lambda r: r["full_gen"] == 0  # noqa: E731  the first generation of the full world (worker.py)
RESTARTED = lambda r: r["full_gen"] == 1  # noqa: E731  the one after it


@dataclass
class Rep:
    kind: str
    index: int
    workdir: Path  # this repetition's directory: logs/ and records/
    endpoint: str  # etcd endpoint (ETCD_KINDS), or a fresh 127.0.0.1:PORT for torchrun's c10d store
    run_id: str
    timeout_scale: float = 1.0
    preload: str | None = None  # etcd-agent-warm's --preload (None: etcd-agent's default)

    @property
    def records(self) -> Path:
        path = self.workdir / "records"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def job(self, nnodes: str, count: int, nproc: int, max_restarts: int, worker_args: list[str],
            worker: str = "") -> Job:
        extra = ["--log-dir", str(self.workdir / "worker-logs")]
        if self.kind == "etcd-agent-warm" and self.preload is not None:
            extra += ["--preload", self.preload]
        job = Job(self.kind, nnodes, count, nproc, max_restarts, self.run_id,
                  ["--out", str(self.records), *worker_args], self.endpoint, extra)
        if worker:
            job.worker = worker
        return job

    def deadline(self, seconds: float) -> float:
        return time.monotonic() + seconds * self.timeout_scale


@dataclass
class Scenario:
    name: str
    group: str
    fn: Callable[[Rep], dict[str, float]]
    needs_etcd: bool = True  # reps of ETCD_KINDS in this scenario use the benchmark's private etcd
    doc: str = ""
    kwargs: dict = field(default_factory=dict)
    kinds: tuple[str, ...] = AGENT_VS_TORCHRUN  # (base, others...) the runner runs and the report compares

    def run(self, rep: Rep) -> dict[str, float]:
        return self.fn(rep, **self.kwargs)


REGISTRY: dict[str, Scenario] = {}


def register(name: str, group: str, fn, needs_etcd: bool = True, doc: str = "",
             kinds: tuple[str, ...] = AGENT_VS_TORCHRUN, **kwargs) -> None:
    assert set(kinds) <= set(KINDS) and len(kinds) >= 2, kinds
    REGISTRY[name] = Scenario(name, group, fn, needs_etcd, doc, kwargs, kinds)


# --- launch ------------------------------------------------------------------------------------------------------
def load_factor(nodes: int) -> float:
    """How much longer than 3 nodes' timeouts N launchers get: they start at once and share this machine's CPUs
    (each torchrun imports torch), so a deadline grows with N. 1 for up to 3 nodes (the 60/90 s the launch and
    crash scenarios always had), N/3 above."""
    return max(1.0, nodes / 3)


def launch(rep: Rep, nodes: int, nproc: int = 2) -> dict[str, float]:
    """N launchers start back to back; every worker exits 0 at once."""
    job = rep.job(str(nodes), nodes, nproc, 0, ["--mode", "exit"])
    launchers = start_all(job, rep.workdir / "logs")
    slow = load_factor(nodes)
    try:
        gen = wait_generation(rep.records, nodes * nproc, launchers, rep.deadline(60 * slow), FIRST, "the job")
        wait_exit(launchers, rep.deadline(60 * slow))
    finally:
        cleanup(launchers)
    return {
        "last launcher start -> all workers started [s]": max(r["t_start"] for r in gen) - launchers[-1].t_start,
        "first launcher start -> all launchers exited [s]": max(la.t_exit for la in launchers)
        - launchers[0].t_start,
    }


# --- crash -------------------------------------------------------------------------------------------------------
def crash(rep: Rep, nodes: int = 3, nproc: int = 2, crash_rank: int = 3) -> dict[str, float]:
    """Rank ``crash_rank`` exits 1 in attempt 0 while its peers block; one restart allowed."""
    job = rep.job(str(nodes), nodes, nproc, 1, ["--mode", "crash", "--crash-rank", str(crash_rank)])
    gen, t_exit, launchers = crash_and_restart(rep, job, nodes * nproc, load_factor(nodes))
    return {
        "worker crash -> all restarted workers started [s]": max(r["t_start"] for r in gen) - t_exit,
        "worker crash -> all launchers exited [s]": max(la.t_exit for la in launchers) - t_exit,
    }


def crash_and_restart(rep: Rep, job: Job, world: int, slow: float, first_s: float = 60, restart_s: float = 90):
    """Run ``job`` (one worker crashes in the first full world, the job restarts once); returns the restarted
    generation's records, the crash time and the launchers, all exited 0."""
    launchers = start_all(job, rep.workdir / "logs")
    try:
        wait_generation(rep.records, world, launchers, rep.deadline(first_s * slow), FIRST, "the first attempt")
        gen = wait_generation(rep.records, world, launchers, rep.deadline(restart_s * slow), RESTARTED, "the restart")
        wait_exit(launchers, rep.deadline(60 * slow))
    finally:
        cleanup(launchers)
    t_exit = [r["t_exit"] for r in records(rep.records) if r["full_gen"] == 0 and "t_exit" in r]
    if len(t_exit) != 1:
        raise RepFailed(f"expected one crash record in the first attempt, found {len(t_exit)}")
    return gen, t_exit[0], launchers


def warm_crash(rep: Rep, nodes: int = 1, nproc: int = 2, crash_after: float = 10.0,
               crash_at: float | None = None) -> dict[str, float]:
    """A real torch DDP job (gloo); rank 1 crashes ``crash_after`` s after its first training step, or with
    ``crash_at`` that long after its start but not before its first step (an early crash, equally far into the
    round under every launcher; etcd-agent --warm-restart's first round runs in the spares started with the agent,
    so its first step comes in milliseconds); one restart. With a late crash the next round's spares have long
    finished their imports; with an early one they started with the round, at idle priority, and may still be
    importing (or, where the agent may not leave SCHED_IDLE, not be started yet)."""
    when = ["--crash-at", str(crash_at)] if crash_at is not None else ["--crash-after", str(crash_after)]
    job = rep.job(str(nodes), nodes, nproc, 1, ["--crash-rank", "1", *when], worker=DDP_WORKER)
    slow = load_factor(nodes) * 2  # every process imports torch on two CPUs
    late = crash_at if crash_at is not None else crash_after
    gen, t_exit, _ = crash_and_restart(rep, job, nodes * nproc, slow, 90, 90 + late)
    return {
        "worker crash -> first training step of the restarted job [s]": max(r["t_step"] for r in gen) - t_exit,
        "worker crash -> all restarted workers started [s]": max(r["t_start"] for r in gen) - t_exit,
    }


# --- node loss ---------------------------------------------------------------------------------------------------
def node_loss(rep: Rep, sig: int = signal.SIGKILL, nodes: int = 3, nproc: int = 2,
              lose_workers: bool = True, recover_s: float = 180) -> dict[str, float]:
    """All workers run; the last launcher gets ``sig`` (with SIGKILL: it and its workers); survivors go on.

    Workers watch their peers' pids and exit 1 when one is gone, as a collective fails on a closed connection.
    """
    world, survivors = nodes * nproc, (nodes - 1) * nproc
    job = rep.job(f"{nodes - 1}:{nodes}", nodes, nproc, 3, ["--mode", "peer-loss", "--world", str(world)])
    launchers = start_all(job, rep.workdir / "logs")
    victim, rest = launchers[-1], launchers[:-1]
    try:
        wait_generation(rep.records, world, launchers, rep.deadline(60), FIRST, "the full job")
        tree = victim.descendants() if lose_workers else []
        t_kill = time.time()
        os.kill(victim.pid, sig)
        for p in tree:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        gen = wait_generation(rep.records, survivors, rest, rep.deadline(recover_s),
                              lambda r: r["t_start"] > t_kill, "the survivors")
        wait_exit(rest, rep.deadline(60))
    finally:
        cleanup(launchers)
    return {
        f"{signal.Signals(sig).name} of a launcher -> survivors' workers started [s]":
            max(r["t_start"] for r in gen) - t_kill,
        f"{signal.Signals(sig).name} of a launcher -> survivors exited [s]": max(la.t_exit for la in rest) - t_kill,
    }


def node_loss_with_spare(rep: Rep, nodes: int = 3, nproc: int = 1, recover_s: float = 180) -> dict[str, float]:
    """A fixed-size job (nnodes N:N) with one launcher more than N: etcd-agent's runs with --spare, torchrun's waits
    as torchrun's extra nodes do. Once all N run, one member launcher (not the first: it hosts torchrun's c10d store)
    is SIGKILLed with its workers; the job must run at full size again, with the spare."""
    world = nodes * nproc
    job = rep.job(f"{nodes}:{nodes}", nodes + 1, nproc, 3, ["--mode", "peer-loss", "--world", str(world)])
    job.spares = 1
    launchers = start_all(job, rep.workdir / "logs")
    try:
        wait_generation(rep.records, world, launchers, rep.deadline(60), FIRST, "the full job")
        members = [la for la in launchers[1:] if la.descendants()]
        if not members:
            raise RepFailed("no member launcher besides the first has workers")
        victim = members[-1]
        rest = [la for la in launchers if la is not victim]
        tree = victim.descendants()
        t_kill = time.time()
        os.kill(victim.pid, signal.SIGKILL)
        for p in tree:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        gen = wait_generation(rep.records, world, rest, rep.deadline(recover_s), lambda r: r["t_start"] > t_kill,
                              "the job at full size with the spare")
        wait_exit(rest, rep.deadline(60))
    finally:
        cleanup(launchers)
    return {"SIGKILL of a member, spare present -> full-size job's workers started [s]":
            max(r["t_start"] for r in gen) - t_kill,
            "SIGKILL of a member, spare present -> launchers exited [s]": max(la.t_exit for la in rest) - t_kill}


# --- footprint ---------------------------------------------------------------------------------------------------
IMPORTS = {"etcd-agent": "import etcd_agent.agent", "torchrun": "import torch.distributed.run"}


def import_time(rep: Rep) -> dict[str, float]:
    """Wall time of a fresh interpreter importing the launcher's module, minus a bare interpreter's."""
    def wall(code: str) -> float:
        t0 = time.perf_counter()
        res = subprocess.run([python(), "-c", code], capture_output=True, timeout=60 * rep.timeout_scale)
        if res.returncode:
            raise RepFailed(f"python -c {code!r} exited {res.returncode}: {res.stderr.decode()[-500:]}")
        return time.perf_counter() - t0
    bare, full = wall("pass"), wall(IMPORTS[rep.kind])
    return {"import time, interpreter start included [s]": full, "import time minus bare interpreter [s]":
            full - bare}


def memory(rep: Rep, nproc: int = 2, window_s: float = 2.0) -> dict[str, float]:
    """RSS of the launcher process alone (not etcd, not workers): peak (VmHWM) and median while workers run."""
    hold = rep.workdir / "release"
    job = rep.job("1", 1, nproc, 0, ["--mode", "hold", "--hold", str(hold)])
    launchers = start_all(job, rep.workdir / "logs")
    la = launchers[0]
    try:
        wait_generation(rep.records, nproc, launchers, rep.deadline(60), FIRST, "the job")
        samples, end = [], time.monotonic() + window_s
        proc = psutil.Process(la.pid)
        while time.monotonic() < end:
            samples.append(proc.memory_info().rss)
            time.sleep(POLL_S)
        peak = vm_hwm(la.pid)
        hold.touch()
        wait_exit(launchers, rep.deadline(60))
    finally:
        cleanup(launchers)
    samples.sort()
    mib = 1024 * 1024
    return {"launcher RSS while workers run, median [MiB]": samples[len(samples) // 2] / mib,
            "launcher peak RSS (VmHWM) [MiB]": peak / mib}


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RepFailed(f"no VmHWM in /proc/{pid}/status")


for _n in (1, 2, 3):
    register(f"launch-{_n}x2", "launch", launch, doc=f"{_n} node(s) x 2 workers, all exit 0", nodes=_n)
register("crash-3x2", "crash", crash, doc="3 nodes x 2, rank 3 exits 1 in restart 0, max-restarts 1")
register("warm-1x2", "warm-restart", warm_crash, doc="torch DDP (gloo) 1 node x 2, rank 1 crashes 10 s after its "
         "first step; torchrun, etcd-agent cold, etcd-agent --warm-restart", kinds=WARM_COLD_TORCHRUN, nodes=1,
         crash_after=10.0)
register("warm-early-1x2", "warm-restart", warm_crash, doc="torch DDP (gloo) 1 node x 2, rank 1 crashes 2 s into the "
         "round (right after its first step where that comes later, as in a cold start); torchrun, etcd-agent cold, "
         "etcd-agent --warm-restart", kinds=WARM_COLD_TORCHRUN, nodes=1, crash_at=2.0)
register("warm-3x2", "warm-restart", warm_crash, doc="torch DDP (gloo) 3 nodes x 2, rank 1 crashes 20 s after its "
         "first step; torchrun, etcd-agent cold, etcd-agent --warm-restart", kinds=WARM_COLD_TORCHRUN, nodes=3,
         crash_after=20.0)
SCALE = (2, 4, 8, 16)  # scale: N launchers of one worker each; "x1" keeps the names apart from launch-Nx2
for _n in SCALE:
    register(f"launch-{_n}x1", "scale", launch, doc=f"{_n} nodes x 1 worker, all exit 0", nodes=_n, nproc=1)
for _n in SCALE:
    register(f"crash-{_n}x1", "scale", crash, doc=f"{_n} nodes x 1, rank 1 exits 1 in restart 0, max-restarts 1",
             nodes=_n, nproc=1, crash_rank=1)
register("footprint-import", "footprint", import_time, needs_etcd=False, doc="import of the launcher module")
register("footprint-rss", "footprint", memory, doc="1 node x 2 workers that wait for a file")
register("node-loss-sigkill", "node-loss", node_loss, doc="3 nodes (nnodes 2:3) x 2, SIGKILL launcher 3 and its "
         "workers once all run", sig=signal.SIGKILL)
register("node-loss-sigterm", "node-loss", node_loss, doc="3 nodes (nnodes 2:3) x 2, SIGTERM launcher 3 alone (a "
         "graceful leave: it stops its own workers)", sig=signal.SIGTERM, lose_workers=False)
register("node-loss-spare", "node-loss", node_loss_with_spare, doc="nnodes 3:3 x 1 plus one spare launcher "
         "(etcd-agent: --spare), SIGKILL a member launcher and its worker once all run")
register("node-loss-sigstop", "node-loss", node_loss, doc="3 nodes (nnodes 2:3) x 2, SIGSTOP launcher 3 and its "
         "workers (a frozen node; its sockets stay open); 90 s to recover", sig=signal.SIGSTOP, recover_s=90)
# torchrun-backend: the same torchrun with --rdzv-backend c10d and with etcd-v3 (the benchmark's etcd), fixed-size
# --nnodes N, both backends' defaults. rdzv-N: the launch metric "last launcher start -> all workers started" is the
# rendezvous time (every launcher started -> every worker of the first round running).
for _n in (2, 4):
    register(f"rdzv-{_n}", "torchrun-backend", launch, doc=f"torchrun c10d vs etcd-v3: {_n} nodes x 1 worker, all "
             "exit 0", kinds=ETCD_V3_VS_C10D, nodes=_n, nproc=1)
register("crash-2", "torchrun-backend", crash, doc="torchrun c10d vs etcd-v3: 2 nodes x 1, rank 1 exits 1 in "
         "restart 0, max-restarts 1", kinds=ETCD_V3_VS_C10D, nodes=2, nproc=1, crash_rank=1)
register("kill-3", "torchrun-backend", node_loss, doc="torchrun c10d vs etcd-v3: 3 nodes (nnodes 2:3) x 1, SIGKILL "
         "launcher 3 and its worker once all run", kinds=ETCD_V3_VS_C10D, sig=signal.SIGKILL, nproc=1)
register("term-3", "torchrun-backend", node_loss, doc="torchrun c10d vs etcd-v3: 3 nodes (nnodes 2:3) x 1, SIGTERM "
         "launcher 3 alone (torch stops its worker and keeps the rendezvous open)", kinds=ETCD_V3_VS_C10D,
         sig=signal.SIGTERM, lose_workers=False, nproc=1)
