"""Run real agent processes for multi-node tests, and read a job's keys back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from etcd_agent.config import EtcdConfig, parse_endpoints
from etcd_agent.etcd.client import Etcd
from etcd_agent.schema.keys import Keys, RunKeys

WORKERS = Path(__file__).parent / "workers"
JOB = str(WORKERS / "job.py")
STARTED: list["CommandLine"] = []  # every agent a test started, killed at teardown if still running


class CommandLine:
    """One ``python -m etcd_agent ARGV`` process (or another ``module``: torchrun is ``torch.distributed.run``), as a
    user would type it, with its output captured to files."""

    def __init__(self, argv: list[str], workdir: Path, node: str, cwd: Path | None = None,
                 module: str = "etcd_agent"):
        self.node = node
        name = f"agent-{node}-{len(STARTED)}"  # two agents with one node id keep separate files
        self.out_path, self.err_path = workdir / f"{name}.out", workdir / f"{name}.err"
        self.out, self.err = open(self.out_path, "w+"), open(self.err_path, "w+")
        # faulthandler: an agent that outlives a test's wait dumps every thread's stack on SIGABRT (see wait)
        self.proc = subprocess.Popen([sys.executable, "-m", module, *argv], stdout=self.out, stderr=self.err,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd,
                                     env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        self.started = time.monotonic()
        STARTED.append(self)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler prints where each thread is stuck, then it ends
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self.kill()
            raise AssertionError(f"agent {self.node} did not exit within {timeout} s:\n{self.stderr()[-8000:]}")

    def stdout(self) -> str:
        self.out.flush()
        return self.out_path.read_text()

    def stderr(self) -> str:
        self.err.flush()
        return self.err_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class AgentProc(CommandLine):
    """An agent of a test job: the etcd, run id, node id and quick timings filled in."""

    def __init__(self, endpoint: str, run_id: str, node: str, workdir: Path, worker_args: list[str],
                 nnodes: str = "1", nproc: int = 1, extra: list[str] = (), entry: str = JOB):
        super().__init__(["--etcd-endpoints", endpoint, "--run-id", run_id, "--node-id", node, "--nnodes", nnodes,
                          "--nproc-per-node", str(nproc), "--local-addr", "127.0.0.1", "--log-dir",
                          str(workdir / "logs"), "--stop-timeout", "3", "--last-call", "1", *extra, entry,
                          *worker_args], workdir, node)


def wait_all(agents: list[AgentProc], timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    return [a.wait(max(1.0, deadline - time.monotonic())) for a in agents]


def records(out: Path) -> dict[tuple[int, int], dict]:
    """(round, rank) -> what job.py recorded."""
    found = {}
    for path in out.glob("*.json"):
        rnd, rank = path.stem.split("-")
        found[(int(rnd), int(rank))] = json.loads(path.read_text())
    return found


ROOT = "/etcd-agent"  # the agents' default --etcd-prefix


def keys_of(run_id: str, gen: int = 1) -> Keys:
    """The keys of job ``gen`` of a run: the first one unless a test runs the run id again."""
    return Keys(ROOT, run_id, gen)


def plan_nodes(plan: dict) -> list[str]:
    """The members of a plan value read from etcd, in group-rank order."""
    from etcd_agent.schema.values import Plan

    return Plan.from_json("plan", plan, 0).nodes


def job_keys(endpoint: str, run_id: str, gen: int | None = None, cfg: EtcdConfig | None = None) -> dict[str, dict]:
    """Every key under the prefix of job ``gen`` of the run (default: the run's current job, from its pointer)
    with its JSON value (raises if any value is not JSON); ``cfg`` connects another way (TLS, auth)."""
    from etcd_agent.coord import txns

    etcd = Etcd(cfg or EtcdConfig(parse_endpoints(endpoint)))
    try:
        keys = keys_of(run_id, gen) if gen else txns.current_job(etcd, RunKeys(ROOT, run_id))
        assert keys is not None, f"run {run_id} has no job under {RunKeys(ROOT, run_id).prefix}"
        kvs, _ = etcd.get_prefix(keys.prefix)
        # the c10d store's keys (torchrun's backend) hold whatever torch writes: not JSON
        return {kv.key: json.loads(kv.value) for kv in kvs if not kv.key.startswith(keys.stores())}
    finally:
        etcd.close()


def wait_for_key(endpoint: str, key: str, timeout: float = 30.0) -> dict:
    """Read the key, else watch it from the read's revision + 1 until it is written; returns its JSON value."""
    import queue

    from etcd_agent.etcd.watch import Watch

    etcd = Etcd(EtcdConfig(parse_endpoints(endpoint)))
    try:
        kv, rev = etcd.get(key)
        if kv is not None:
            return json.loads(kv.value)
        events: queue.Queue = queue.Queue()
        watch = Watch(etcd, key, rev + 1, events.put).start()
        try:
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{key} was not written within {timeout} s")
                try:
                    batch = events.get(timeout=left)
                except queue.Empty:
                    continue
                for ev in getattr(batch, "__iter__", lambda: iter(()))():
                    if ev.key == key and ev.kind == "put":
                        return json.loads(ev.kv.value)
        finally:
            watch.cancel()
    finally:
        etcd.close()


class RoundWatcher:
    """Follows ``P/round`` through a watch and keeps every value with the wall time it arrived."""

    def __init__(self, endpoint: str, run_id: str, gen: int = 1):
        import threading

        from etcd_agent.etcd.watch import Watch

        self.key = keys_of(run_id, gen).round()
        self.values: list[tuple[float, dict]] = []
        self._cond = threading.Condition()
        self._etcd = Etcd(EtcdConfig(parse_endpoints(endpoint)))
        kv, rev = self._etcd.get(self.key)
        if kv is not None:
            self.values.append((time.time(), json.loads(kv.value)))
        self._watch = Watch(self._etcd, self.key, rev + 1, self._deliver, probe_interval=0.5).start()

    def _deliver(self, batch) -> None:
        with self._cond:
            for ev in getattr(batch, "kvs", None) or batch:
                kv = getattr(ev, "kv", ev)
                if kv.key == self.key and kv.value:
                    self.values.append((time.time(), json.loads(kv.value)))
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 30.0) -> dict:
        """The first round value (in arrival order) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, value in self.values:
                    if predicate(value):
                        return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no round value matched within {timeout} s; saw "
                                         f"{[v for _, v in self.values]}")
                self._cond.wait(left)

    def close(self) -> None:
        self._watch.cancel()
        self._etcd.close()


def poll_until(check, timeout: float, what: str, interval: float = 0.02):
    """For what no event reaches a test (files workers write, a log line, a counter on another thread): call
    ``check`` until it returns something truthy, which is returned; fails naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(interval)


def wait_records(out: Path, wanted: set[tuple[int, int]], agents: list[AgentProc], timeout: float = 30.0) -> dict:
    """Wait until job.py recorded every (round, rank) in ``wanted``; fail early if an agent dies."""
    def check():
        for a in agents:
            assert a.proc.poll() is None or a.proc.returncode == 0, \
                f"agent {a.node} exited {a.proc.returncode}:\n{a.stderr()[-3000:]}"
        found = records(out)
        return found if wanted <= found.keys() else None
    return poll_until(check, timeout, f"records {sorted(wanted)} did not all appear")


def start_agents(n: int, endpoint: str, run_id: str, tmp_path: Path, worker_args: list[str], nproc: int = 2,
                 nnodes: str | None = None, extra=(), first: int = 0) -> tuple[list[AgentProc], Path]:
    """``n`` agents node-<first>..node-<first+n-1> running job.py, recording into tmp_path/out."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return [AgentProc(endpoint, run_id, f"node-{i}", tmp_path, [str(out), *worker_args], nnodes=nnodes or str(n),
                      nproc=nproc, extra=list(extra)) for i in range(first, first + n)], out
