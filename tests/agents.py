"""Run real agent processes for multi-node tests, and wait for what they do: record files, log lines, etcd keys.

Every wait here wakes on the event itself: a record file written (inotify, ``etcd_agent.testing.records``), a line
appended to an agent's log file (inotify), an agent's exit (a reaper thread, a pidfd), a key put or deleted (an
etcd watch). ``poll_until`` is for the few things that have no event a test can wait on (a counter on another
thread, an etcd metric, an HTTP health answer).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

from etcd_agent.config import EtcdConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.etcd.client import Etcd
from etcd_agent.schema.keys import Keys, RunKeys
from etcd_agent.testing import records as record_files
from etcd_agent.testing.procs import Reaper, agent_flags

T = TypeVar("T")
WORKERS = Path(__file__).parent / "workers"
JOB = str(WORKERS / "job.py")
STARTED: list["CommandLine"] = []  # every agent a test started, killed at teardown if still running
# A line an agent logged in the text format (logs.FORMAT): time, level letter, message (with its stamp). Worker
# output and the command's last "etcd-agent: error:" line are not such lines.
AGENT_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} ([DIWEC]) (.*)$")


def agent_lines(stderr: str) -> list[tuple[str, str]]:
    """(level letter, message) of every line the agent logged."""
    return [(m.group(1), m.group(2)) for m in map(AGENT_LINE.match, stderr.splitlines()) if m]


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
        self.reaper = Reaper(self.proc, name)  # its exit is an event, with its wall time: ``ended_at``
        STARTED.append(self)

    @property
    def ended_at(self) -> float | None:
        """Wall time of the process's exit (to a thread wake-up), None while it runs."""
        return self.reaper.ended_at

    def wait(self, timeout: float = 60.0) -> int:
        code = self.reaper.wait(timeout)
        if code is not None:
            return code
        self.proc.send_signal(signal.SIGABRT)  # faulthandler prints where each thread is stuck, then it ends
        self.reaper.wait(5)
        self.kill()
        raise AssertionError(f"agent {self.node} did not exit within {timeout} s:\n{self.stderr()[-8000:]}")

    def stdout(self) -> str:
        self.out.flush()
        return self.out_path.read_text()

    def stderr(self) -> str:
        self.err.flush()
        return self.err_path.read_text()

    def kill(self) -> None:
        if not self.reaper.ended.is_set():
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass  # it ended just now: the reaper has it
            self.reaper.ended.wait()


class AgentProc(CommandLine):
    """An agent of a test job: the etcd, run id, node id and quick timings filled in."""

    def __init__(self, endpoint: str, run_id: str, node: str, workdir: Path, worker_args: list[str],
                 nnodes: str = "1", nproc: int = 1, extra: list[str] = (), entry: str = JOB):
        super().__init__([*agent_flags(endpoint, run_id, node, nnodes, nproc), "--log-dir", str(workdir / "logs"),
                          "--stop-timeout", "3", "--last-call", "1", *extra, entry, *worker_args], workdir, node)


def wait_all(agents: list[AgentProc], timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    return [a.wait(max(1.0, deadline - time.monotonic())) for a in agents]


records = record_files.by_round_rank  # (round, rank) -> what job.py recorded in a directory


ROOT = "/etcd-agent"  # the agents' default --etcd-prefix


def keys_of(run_id: str, gen: int = 1) -> Keys:
    """The keys of job ``gen`` of a run: the first one unless a test runs the run id again."""
    return Keys(ROOT, run_id, gen)


def plan_of(job: dict[str, dict], key: str):
    """The whole plan whose header is ``key`` in ``job`` (``job_keys``): the header with its parts."""
    from etcd_agent.schema.values import Plan, PlanPart

    parts = [PlanPart.from_json(k, v) for k, v in job.items() if k.startswith(key + "/")]
    return Plan.from_json(key, job[key], 0).with_parts(key, parts)


def plan_nodes(job: dict[str, dict], key: str) -> list[str]:
    """The members of the plan whose header is ``key`` in ``job`` (``job_keys``), in group-rank order."""
    return plan_of(job, key).nodes


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


def watch_until(endpoint: str, prefix: str, pick: Callable[[dict[str, bytes]], T], timeout: float, what: str) -> T:
    """``pick(keys)`` once truthy, where ``keys`` maps each key under ``prefix`` to its value: read the range, then
    watch it from the read's revision + 1 and ask again after every change; fails naming ``what`` after
    ``timeout``."""
    from etcd_agent.etcd.watch import Resync, wait_for

    etcd = Etcd(EtcdConfig(parse_endpoints(endpoint)))
    try:
        kvs, rev = etcd.get_prefix(prefix)
        keys = {kv.key: kv.value for kv in kvs}
        found = [pick(keys)]

        def seen(delivery) -> bool:
            if isinstance(delivery, Resync):
                keys.clear()
                keys.update((kv.key, kv.value) for kv in delivery.kvs)
            for ev in () if isinstance(delivery, Resync) else delivery:
                if ev.kind == "put":
                    keys[ev.key] = ev.kv.value
                else:
                    keys.pop(ev.key, None)
            found[0] = pick(keys)
            return bool(found[0])
        assert found[0] or wait_for(etcd, prefix, rev, timeout, seen), f"{what} within {timeout} s"
        return found[0]
    finally:
        etcd.close()


def wait_for_key(endpoint: str, key: str, timeout: float = 60.0) -> dict:
    """The key's JSON value, once it is written (read, then a watch); fails after ``timeout``."""
    value = watch_until(endpoint, key, lambda keys: keys.get(key), timeout, f"{key} was not written")
    return json.loads(value)


def wait_key_deleted(endpoint: str, key: str, timeout: float = 60.0) -> None:
    """Return once ``key`` is absent (read, then a watch for its delete); fails after ``timeout``."""
    watch_until(endpoint, key, lambda keys: key not in keys, timeout, f"{key} was not deleted")


class RoundWatcher:
    """Follows ``P/round`` through a watch and keeps every value with the wall time it arrived and its etcd revision
    (``revision_of``: where it stands in etcd's history, an order no clock can blur)."""

    def __init__(self, endpoint: str, run_id: str, gen: int = 1):
        import threading

        from etcd_agent.etcd.watch import Watch

        self.key = keys_of(run_id, gen).round()
        self.values: list[tuple[float, dict, int]] = []
        self._cond = threading.Condition()
        self._etcd = Etcd(EtcdConfig(parse_endpoints(endpoint)))
        kv, rev = self._etcd.get(self.key)
        if kv is not None:
            self.values.append((time.time(), json.loads(kv.value), kv.mod_revision))
        self._watch = Watch(self._etcd, self.key, rev + 1, self._deliver, probe_interval=0.5).start()

    def _deliver(self, batch) -> None:
        with self._cond:
            for ev in getattr(batch, "kvs", None) or batch:
                kv = getattr(ev, "kv", ev)
                if kv.key == self.key and kv.value:
                    self.values.append((time.time(), json.loads(kv.value), kv.mod_revision))
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 60.0) -> dict:
        """The first round value (in arrival order) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, value, _ in self.values:
                    if predicate(value):
                        return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no round value matched within {timeout} s; saw "
                                         f"{[v for _, v, _ in self.values]}")
                self._cond.wait(left)

    def revision_of(self, value: dict) -> int:
        """The etcd revision that wrote ``value`` (one ``wait_for`` returned)."""
        with self._cond:
            return next(rev for _, v, rev in self.values if v is value)

    def close(self) -> None:
        self._watch.cancel()
        self._etcd.close()


def poll_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Only for what has no event a test can wait on (a counter on another thread, an etcd metric, an HTTP answer):
    call ``check`` until it returns something truthy, which is returned; fails naming ``what`` after ``timeout``.
    Record files, log lines, exits and etcd keys have events: ``until_recorded``, ``wait_logged``, ``wait_all``,
    ``wait_for_key``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(interval)


def _still_fine(agents: list[CommandLine]) -> None:
    for a in agents:
        assert a.proc.poll() in (None, 0), f"agent {a.node} exited {a.proc.returncode}:\n{a.stderr()[-3000:]}"


def until_recorded(out: Path, pick: Callable[[dict[tuple[int, int], dict]], T], what: str,
                   agents: list[CommandLine] = (), timeout: float = 60.0) -> T:
    """``pick(records(out))`` once it is truthy, checked at every record written to ``out`` (inotify) and at every
    exit of ``agents``; fails at once if one of them exits non-zero, and naming ``what`` after ``timeout``."""
    def check():
        _still_fine(agents)
        return pick(records(out))
    return record_files.wait_until(check, timeout, what, out, pids=[a.proc.pid for a in agents])


def wait_records(out: Path, wanted: set[tuple[int, int]], agents: list[AgentProc], timeout: float = 60.0) -> dict:
    """Wait until job.py recorded every (round, rank) in ``wanted``; fail early if an agent dies."""
    return until_recorded(out, lambda found: found if wanted <= found.keys() else None,
                          f"records {sorted(wanted)} did not all appear", agents, timeout)


def wait_logged(agent: CommandLine, text: str, timeout: float = 60.0, check: Callable[[str], bool] | None = None
                ) -> str:
    """The agent's stderr once ``text`` is in it (or ``check(stderr)`` holds), woken by each write to its log file
    (inotify on its directory); fails at once if the agent ended without it, and naming the text after
    ``timeout``."""
    check = check or (lambda err: text in err)

    def logged():
        err = agent.stderr()
        if check(err):
            return err
        ended = agent.proc.poll()
        assert ended is None or check(agent.stderr()), \
            f"agent {agent.node} exited {ended} without logging {text!r}:\n{err[-3000:]}"
        return None
    return record_files.wait_until(logged, timeout, f"{agent.node} did not log {text!r}", agent.err_path.parent,
                                   pids=[agent.proc.pid], mask=record_files.IN_MODIFY)


def start_agents(n: int, endpoint: str, run_id: str, tmp_path: Path, worker_args: list[str], nproc: int = 2,
                 nnodes: str | None = None, extra=(), first: int = 0) -> tuple[list[AgentProc], Path]:
    """``n`` agents node-<first>..node-<first+n-1> running job.py, recording into tmp_path/out."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return [AgentProc(endpoint, run_id, f"node-{i}", tmp_path, [str(out), *worker_args], nnodes=nnodes or str(n),
                      nproc=nproc, extra=list(extra)) for i in range(first, first + n)], out
