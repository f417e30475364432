"""Tests of etcd_agent.node.workers with real processes: tiny plain-Python workers from tests/workers/.

Every wait is on an event (exit callbacks, a Unix-socket mailbox the workers write to, pidfds), never a sleep.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import queue
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from agents import poll_until
from etcd_agent.testing.procs import gone
from etcd_agent import config, proctree
from etcd_agent.node import spawn
from etcd_agent.config import StdSpec, WorkerConfig
from etcd_agent.errors import ConfigError
from etcd_agent.node.worker_logs import Dest, line_prefix, route
from etcd_agent.node.warm import SparePool
from etcd_agent.node.api import Assignment, GroupFailed, GroupSucceeded, WorkerExit
from etcd_agent.node.env import worker_env
from etcd_agent.node.workers import WorkerGroup

WORKERS = Path(__file__).parent / "workers"
REPO = Path(__file__).parent.parent
TORCHRUN_KEYS = {
    "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
    "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_SIGNALS_TO_HANDLE",
}
TIMEOUT = 60.0  # an upper bound on any wait (a hang guard, under pytest's 120 s); a passing test never gets near it
GRACE_PAST_THE_TEST = 600.0  # a stop grace longer than the test may run: a stop that returned did not wait it out
# The guarantees that hold for a cold worker hold for one started from a warm spare (--warm-restart) as well.
COLD_AND_WARM = pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])


def assignment(**kw) -> Assignment:
    values = dict(run_id="run1", round=3, group_rank=1, group_world_size=2, rank_offset=4, world_size=6,
                  master_addr="10.0.0.1", master_port=29400, restart_count=2, max_restarts=5)
    values.update(kw)
    return Assignment(**values)


class Exits:
    """An on_exit callback that records exits and sets an event once ``n`` arrived; ``events`` holds what the group
    posted (``GroupSucceeded``/``GroupFailed``)."""

    def __init__(self, n: int):
        self.n = n
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.items: list[WorkerExit] = []
        self.threads: list[str] = []
        self.done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, ex: WorkerExit) -> None:
        with self._lock:
            self.items.append(ex)
            self.threads.append(threading.current_thread().name)
            if len(self.items) >= self.n:
                self.done.set()

    def wait(self) -> list[WorkerExit]:
        assert self.done.wait(TIMEOUT), f"only {len(self.items)} of {self.n} exits were reported"
        return sorted(self.items, key=lambda e: e.local_rank)

    def posted(self) -> list:
        """The group's events so far (call once the group is stopped: its waiters have posted by then)."""
        found = []
        while not self.events.empty():
            found.append(self.events.get())
        return found


class Mailbox:
    """A Unix socket the workers send one line to per connection (tests/workers/_notify.py)."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.sock.settimeout(TIMEOUT)

    def get(self) -> list[str]:
        conn, _ = self.sock.accept()
        with conn, conn.makefile() as f:
            return f.readline().split()

    def ready(self, n: int) -> list[tuple[int, int]]:
        """``n`` ready messages as (pid, ppid)."""
        out = []
        for _ in range(n):
            word, pid, ppid = self.get()
            assert word == "ready"
            out.append((int(pid), int(ppid)))
        return out


@pytest.fixture
def mailbox(monkeypatch):
    short = tempfile.mkdtemp(prefix="wk")  # a socket path must stay under 108 bytes
    box = Mailbox(os.path.join(short, "s"))
    monkeypatch.setenv("NOTIFY_SOCK", box.path)
    yield box
    box.sock.close()
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def make_group(tmp_path):
    """``make_group(script, *args, nproc=1, n_exits=nproc, **cfg)`` -> (group, exits); stopped at teardown."""
    def make(script: str, *args: str, nproc: int = 1, n_exits: int | None = None, node: str = "node-a",
             warm: bool = False, worker_timeout: float = 0.0, **kw):
        """``warm``: the group's first start hands every worker to a spare of a SparePool (--warm-restart)."""
        entry = script if kw.get("no_python") or kw.get("module") else str(WORKERS / script)
        cfg = WorkerConfig(entrypoint=entry, args=tuple(args), nproc=nproc, log_dir=str(tmp_path / "logs"),
                           warm_restart=warm, preload=(), **kw)
        exits = Exits(nproc if n_exits is None else n_exits)
        spares = None
        if warm:
            spares = SparePool(cfg, cfg.log_dir, "run1", node)
            spares.fill({i: worker_env(cfg, assignment(), i, config.worker_base_env(), "") for i in range(nproc)})
            spares.wait_ready(TIMEOUT)
            pools.append((spares, nproc))
        group = WorkerGroup(cfg, exits.events.put, node_id=node, spares=spares, worker_timeout=worker_timeout,
                            on_exit=exits)
        groups.append(group)
        return group, exits

    groups, pools = [], []
    yield make
    for g in groups:
        g.stop("test teardown")
    for pool, nproc in pools:
        pool.close()
        assert pool.handed == nproc, "a warm test's workers did not start from their spares"


def kill_quietly(pids: list[int]) -> None:
    """Cleanup after a failed assertion, so a broken build leaves no process behind."""
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


def rank_dir(tmp_path: Path, rank: int, round_: int = 3, run: str = "run1", node: str = "node-a") -> Path:
    return tmp_path / "logs" / run / "job_0001" / node / f"round_{round_:04d}" / f"rank_{rank}"


# -- environment -------------------------------------------------------------------------------------------------


def test_worker_env_has_exactly_torchruns_variables():
    cfg = WorkerConfig(entrypoint="train.py", args=(), nproc=2)
    base = {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "1,3", "RANK": "stale"}
    env = worker_env(cfg, assignment(), 1, base, "/logs/error.json")
    assert set(env) - set(base) == (TORCHRUN_KEYS | {"OMP_NUM_THREADS", "ETCD_AGENT_ROUND"}) - {"RANK"}
    assert env == {
        "PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "1,3",
        "RANK": "5", "LOCAL_RANK": "1", "GROUP_RANK": "1", "ROLE_RANK": "5", "ROLE_NAME": "default",
        "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "6", "GROUP_WORLD_SIZE": "2", "ROLE_WORLD_SIZE": "6",
        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400", "TORCHELASTIC_RESTART_COUNT": "2",
        "TORCHELASTIC_MAX_RESTARTS": "5", "TORCHELASTIC_RUN_ID": "run1", "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "OMP_NUM_THREADS": "1", "TORCHELASTIC_ERROR_FILE": "/logs/error.json",
        "ETCD_AGENT_ROUND": "3", "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
    }


def test_worker_env_keeps_what_the_user_set():
    many = WorkerConfig(entrypoint="train.py", args=(), nproc=4)
    one = WorkerConfig(entrypoint="train.py", args=(), nproc=1)
    user = {"OMP_NUM_THREADS": "8", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    assert worker_env(many, assignment(), 0, user, "e")["OMP_NUM_THREADS"] == "8"
    assert worker_env(many, assignment(), 0, user, "e")["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert "OMP_NUM_THREADS" not in worker_env(one, assignment(), 0, {}, "e")
    tee = WorkerConfig(entrypoint="train.py", args=(), nproc=1, tee=StdSpec(3))
    assert "PYTHONUNBUFFERED" not in worker_env(tee, assignment(), 0, {}, "e")  # torchrun never sets it


def test_worker_env_role_and_signals_are_torchruns():
    cfg = WorkerConfig(entrypoint="train.py", args=(), nproc=1, role="trainer", signals_to_handle="SIGUSR1")
    env = worker_env(cfg, assignment(), 0, {"TORCHELASTIC_SIGNALS_TO_HANDLE": "stale"}, "e")
    assert env["ROLE_NAME"] == "trainer"
    assert env["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGUSR1"  # torchrun overwrites it in its own environment


def test_worker_env_virtual_local_rank():
    virtual = WorkerConfig(entrypoint="train.py", args=(), nproc=3, virtual_local_rank=True)
    env = worker_env(virtual, assignment(), 1, {"CUDA_VISIBLE_DEVICES": "4, 6,7"}, "e")
    assert (env["LOCAL_RANK"], env["CUDA_VISIBLE_DEVICES"], env["RANK"]) == ("0", "6", "5")
    env = worker_env(virtual, assignment(), 2, {}, "e")
    assert (env["LOCAL_RANK"], env["CUDA_VISIBLE_DEVICES"]) == ("0", "2")
    with pytest.raises(ConfigError, match=r"local rank 2 .*CUDA_VISIBLE_DEVICES='4,6' lists 2"):
        worker_env(virtual, assignment(), 2, {"CUDA_VISIBLE_DEVICES": "4,6"}, "e")
    plain = WorkerConfig(entrypoint="train.py", args=(), nproc=3)
    env = worker_env(plain, assignment(), 2, {"CUDA_VISIBLE_DEVICES": "4,6"}, "e")
    assert (env["LOCAL_RANK"], env["CUDA_VISIBLE_DEVICES"]) == ("2", "4,6")
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(plain, assignment(), 2, {}, "e")


def test_a_virtual_local_rank_without_a_device_fails_start_before_any_worker_runs(make_group, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    group, exits = make_group("hang.py", nproc=2, virtual_local_rank=True)
    with pytest.raises(ConfigError, match="--virtual-local-rank"):
        group.start(assignment())
    assert group.pids == [] and not group.running and exits.items == []


@pytest.fixture
def grpc_env(monkeypatch):
    """GRPC_ENABLE_FORK_SUPPORT absent and not marked as the agent's own; restored afterwards."""
    name = "GRPC_ENABLE_FORK_SUPPORT"
    was_own = name in config._AGENT_OWN_ENV
    monkeypatch.delenv(name, raising=False)
    config._AGENT_OWN_ENV.discard(name)
    yield name
    config._AGENT_OWN_ENV.discard(name)
    if was_own:
        config._AGENT_OWN_ENV.add(name)


@pytest.mark.parametrize("user_value", [None, "true"])
def test_what_the_agent_set_for_itself_is_not_inherited(make_group, tmp_path, monkeypatch, grpc_env, user_value):
    if user_value is not None:
        monkeypatch.setenv(grpc_env, user_value)
    config.set_agent_env(grpc_env, "false")
    assert os.environ[grpc_env] == (user_value or "false")
    out = tmp_path / "out"
    out.mkdir()
    group, exits = make_group("record_env.py", str(out))
    group.start(assignment())
    exits.wait()
    assert json.loads((out / "env_4.json").read_text())["env"].get(grpc_env) == user_value


@pytest.mark.torch
def test_worker_env_keys_match_a_real_torchrun(tmp_path):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    out = tmp_path / "torchrun"
    out.mkdir()
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "LC_ALL": "C.UTF-8"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(WORKERS / "record_env.py"), str(out)], env=base, check=True, timeout=60,
                   capture_output=True)
    theirs = json.loads((out / "env_1.json").read_text())["env"]
    ours = worker_env(WorkerConfig(entrypoint="x", args=(), nproc=2), assignment(), 1, base, "e")
    assert set(theirs) - set(base) == set(ours) - set(base) - {"ETCD_AGENT_ROUND"}
    shared = {"ROLE_NAME", "TORCHELASTIC_SIGNALS_TO_HANDLE", "LOCAL_RANK", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"}
    assert {k: theirs[k] for k in shared} == {k: ours[k] for k in shared}


# -- start and exits ---------------------------------------------------------------------------------------------


@COLD_AND_WARM
def test_start_runs_every_worker_with_its_environment(make_group, tmp_path, warm):
    out = tmp_path / "out"
    out.mkdir()
    group, exits = make_group("record_env.py", str(out), nproc=2, warm=warm)
    group.start(assignment())
    assert len(group.pids) == 2
    done = exits.wait()
    assert [(e.local_rank, e.rank, e.returncode, e.round, e.failed) for e in done] == [
        (0, 4, 0, 3, False), (1, 5, 0, 3, False)]
    assert all(name.startswith("etcd-agent-workers-wait") for name in exits.threads)
    assert not group.running
    for e in done:
        facts = json.loads((out / f"env_{e.rank}.json").read_text())
        assert facts["pid"] == e.pid and facts["pgid"] == e.pid and facts["sid"] == e.pid
        assert facts["ppid"] == os.getpid() and facts["pdeathsig"] == signal.SIGKILL
        assert facts["stdin"] == "/dev/null"
        assert facts["env"]["LOCAL_RANK"] == str(e.local_rank)
        assert facts["env"]["ETCD_AGENT_ROUND"] == "3"
        d = rank_dir(tmp_path, e.rank)
        assert facts["env"]["TORCHELASTIC_ERROR_FILE"] == str(d / "error.json")
        assert not (d / "stdout.log").exists()  # stdout went to the console, as under torchrun
        assert (d / "stderr.log").read_text() == ""


def test_exit_code_and_signal_are_reported(make_group):
    group, exits = make_group("exit_code.py", "3")
    group.start(assignment())
    (ex,) = exits.wait()
    assert (ex.returncode, ex.failed, ex.signal_name, ex.describe()) == (3, True, None, "exit code 3")
    group.stop("next case")
    group, exits = make_group("exit_code.py", "SIGKILL")
    group.start(assignment(round=4))
    (ex,) = exits.wait()
    assert (ex.returncode, ex.signal_name, ex.describe(), ex.round) == (-9, "SIGKILL", "signal SIGKILL", 4)


def test_start_refuses_while_workers_run_and_restarts_after_stop(make_group, mailbox):
    group, exits = make_group("hang.py", n_exits=2)
    group.start(assignment(round=1))
    mailbox.ready(1)
    with pytest.raises(RuntimeError, match="stop"):
        group.start(assignment(round=2))
    group.stop("new round")
    group.start(assignment(round=2))
    mailbox.ready(1)
    group.stop("done")
    assert [e.round for e in exits.wait()] == [1, 2]


# -- the group's events (node.api) ---------------------------------------------------------------------------------

def test_workers_that_all_exit_0_make_one_success(make_group):
    group, exits = make_group("exit_code.py", "0", nproc=2)
    group.start(assignment())
    exits.wait()
    group.stop("the round is over")
    assert exits.posted() == [GroupSucceeded(3)]


def test_the_first_failure_is_the_groups_and_a_later_one_is_said_once(make_group, caplog):
    group, exits = make_group("exit_code.py", "3", nproc=2)
    with caplog.at_level(logging.WARNING, logger="etcd_agent.node.workers"):
        group.start(assignment())
        exits.wait()
        group.stop("the round is over")
    (failed,) = exits.posted()
    assert isinstance(failed, GroupFailed) and failed.round == 3
    r = failed.report
    assert (r.exitcode, r.node, r.round, r.hang) == (3, "node-a", 3, False) and r.rank in (4, 5)
    assert "the worker exited with exit code 3" in r.message
    other, pids = 9 - r.rank, {e.rank: e.pid for e in exits.items}  # ranks 4 and 5
    assert [m for m in caplog.messages if "failed too" in m] == [
        f"[run1 node-a r3] worker rank {other} (pid {pids[other]}) failed too, with "
        "exit code 3"]


def test_the_workers_a_stop_ends_make_no_event(make_group, mailbox):
    group, exits = make_group("hang.py", nproc=2, stop_timeout=TIMEOUT)
    group.start(assignment())
    mailbox.ready(2)
    group.stop("another node failed")
    assert [e.returncode for e in exits.wait()] == [-signal.SIGTERM] * 2
    assert exits.posted() == []


def test_a_failure_just_before_a_stop_keeps_its_report(make_group):
    """The worker fails on its own; its waiter has not told the group yet when a stop (for another reason) begins:
    the failure ended before the stop's first signal, so it is still the group's."""
    group, exits = make_group("exit_code.py", "3", stop_timeout=TIMEOUT)
    reaped, release = threading.Event(), threading.Event()
    report = group._report

    def held(w, returncode):  # the worker is reaped; its waiter waits here until the stop has begun
        reaped.set()
        release.wait(TIMEOUT)
        report(w, returncode)
    group._report = held
    group.start(assignment())
    assert reaped.wait(TIMEOUT)
    stopping = threading.Thread(target=group.stop, args=("another node failed",))
    stopping.start()
    poll_until(lambda: group.state.value == "stopping", TIMEOUT, "the stop begun")
    release.set()
    stopping.join(TIMEOUT)
    (failed,) = exits.posted()
    assert isinstance(failed, GroupFailed) and failed.report.exitcode == 3


def test_a_worker_that_makes_no_progress_fails_the_group_from_the_group(make_group, mailbox):
    """--worker-timeout is the group's own check: a worker that never beats (hang.py) fails the group with a hang
    report, with no agent polling it; the hung worker runs until the group is stopped, and its stop is no second
    failure."""
    group, exits = make_group("hang.py", stop_timeout=TIMEOUT, worker_timeout=0.5)
    group.start(assignment())
    mailbox.ready(1)
    failed = exits.events.get(timeout=TIMEOUT)
    assert isinstance(failed, GroupFailed) and failed.round == 3
    r = failed.report
    assert (r.hang, r.exitcode, r.signal, r.rank, r.node) == (True, None, None, 4, "node-a")
    assert "(--worker-timeout 0.5); the worker is considered hung" in r.message
    assert group.running and exits.items == []
    group.stop("the group hung")
    assert [e.returncode for e in exits.wait()] == [-signal.SIGTERM]
    assert exits.posted() == []


# -- stop --------------------------------------------------------------------------------------------------------


@COLD_AND_WARM
def test_stop_ends_workers_with_sigterm(make_group, mailbox, warm):
    group, exits = make_group("hang.py", nproc=2, stop_timeout=GRACE_PAST_THE_TEST, warm=warm)
    group.start(assignment())
    assert sorted(pid for pid, _ in mailbox.ready(2)) == sorted(group.pids)
    assert group.running
    group.stop("test")  # returns once the workers are gone, not after the grace
    assert [e.returncode for e in exits.wait()] == [-signal.SIGTERM, -signal.SIGTERM]
    assert not group.running
    group.stop("again")  # idempotent
    assert len(exits.items) == 2


@COLD_AND_WARM
def test_stop_kills_workers_that_ignore_sigterm_after_the_grace(make_group, mailbox, warm):
    """The order, as the worker tells it: SIGTERM first, which it survives (it says so), then SIGKILL."""
    group, exits = make_group("hang.py", "--ignore-term", "--note-term", stop_timeout=0.5, warm=warm)
    group.start(assignment())
    ((pid, _),) = mailbox.ready(1)
    group.stop("test")
    (ex,) = exits.wait()
    assert ex.signal_name == "SIGKILL"
    assert mailbox.get() == ["term", str(pid)], "the worker was killed without a SIGTERM first"


def test_a_fencing_stop_brings_a_slower_stops_sigkill_forward(make_group, mailbox):
    """The main thread stops the group with a grace longer than the test may run; the keepalive thread, fencing,
    stops it with 0.5 s while the first stop still waits: the worker (which ignores SIGTERM) is SIGKILLed at the
    fence's deadline, and both calls return, long before the first one's grace."""
    from etcd_agent.node.workers import GroupState

    group, exits = make_group("hang.py", "--ignore-term", stop_timeout=GRACE_PAST_THE_TEST)
    group.start(assignment())
    mailbox.ready(1)
    slow = threading.Thread(target=group.stop, args=("a new round",), daemon=True)
    slow.start()
    poll_until(lambda: group.state is GroupState.STOPPING, TIMEOUT, "the first stop under way")
    fence = threading.Thread(target=group.stop, args=("self-fencing",), kwargs={"grace": 0.5}, daemon=True)
    fence.start()
    fence.join(TIMEOUT)
    slow.join(TIMEOUT)
    assert not fence.is_alive() and not slow.is_alive()  # with the first grace kept, both would still wait
    (ex,) = exits.wait()
    assert ex.signal_name == "SIGKILL" and group.state is GroupState.STOPPED


def test_the_group_moves_through_its_states_only_forward(make_group, mailbox):
    from etcd_agent.node.workers import GroupState

    group, _exits = make_group("hang.py", stop_timeout=5)
    assert group.state is GroupState.IDLE
    group.stop("nothing runs")  # a stop before any start changes nothing
    assert group.state is GroupState.IDLE
    group.start(assignment())
    assert group.state is GroupState.RUNNING
    with pytest.raises(RuntimeError, match="stop"):
        group.start(assignment())
    group.stop("test")
    assert group.state is GroupState.STOPPED
    group.stop("again")  # idempotent
    assert group.state is GroupState.STOPPED


@COLD_AND_WARM
@pytest.mark.parametrize("scan", ["proc", "psutil"])
def test_no_descendant_survives_stop(make_group, mailbox, monkeypatch, warm, scan):
    """Found by one pass over /proc, or by psutil alone where /proc cannot be read."""
    if scan == "psutil":
        monkeypatch.setattr(proctree, "_proc_table", lambda: None)
    group, exits = make_group("spawn_child.py", stop_timeout=0.5, warm=warm)
    group.start(assignment())
    (worker,) = group.pids
    kids = [pid for pid, ppid in mailbox.ready(2) if ppid == worker]
    try:
        assert len(kids) == 2
        group.stop("test")
        exits.wait()
        assert gone(worker)
        assert [pid for pid in kids if not gone(pid)] == []
    finally:
        kill_quietly(kids)


# -- failure reports ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, message", [("record", "RuntimeError: boom"), ("plain", "plain message")])
def test_failure_report_reads_the_error_file(make_group, tmp_path, kind, message):
    group, exits = make_group("write_error_file.py", kind, nproc=2)
    group.start(assignment())
    ex = exits.wait()[1]
    report = group.failure_report(ex).to_json()
    assert json.loads(json.dumps(report)) == report
    d = rank_dir(tmp_path, 5)
    assert report == {
        "rank": 5, "local_rank": 1, "pid": ex.pid, "exitcode": 1, "signal": None, "message": message,
        "error_file": str(d / "error.json"), "stderr_tail": "Traceback (most recent call last):\nRuntimeError: boom",
        "time": ex.time, "round": 3, "node": "node-a", "hang": False, "lost": False,
    }


def test_failure_report_says_when_the_error_file_is_malformed(make_group):
    group, exits = make_group("write_error_file.py", "bad")
    group.start(assignment())
    report = group.failure_report(exits.wait()[0]).to_json()
    assert "not valid JSON" in report["message"] and "exit code 1" in report["message"]


@COLD_AND_WARM
def test_failure_report_falls_back_to_the_stderr_tail(make_group, tmp_path, warm):
    group, exits = make_group("exit_code.py", "SIGKILL", warm=warm)
    group.start(assignment())
    report = group.failure_report(exits.wait()[0]).to_json()
    assert report["signal"] == "SIGKILL" and report["exitcode"] == -9
    tail = report["stderr_tail"].splitlines()
    assert len(tail) == 20 and tail[0] == "stderr line 11" and tail[-1] == "about to end with SIGKILL"
    assert "no error file" in report["message"] and "signal SIGKILL" in report["message"]
    assert report["message"].endswith("about to end with SIGKILL")
    assert not os.path.exists(report["error_file"])


def test_a_stale_error_file_is_removed_before_start(make_group, tmp_path):
    d = rank_dir(tmp_path, 4)
    d.mkdir(parents=True)
    (d / "error.json").write_text(json.dumps({"message": "from an earlier attempt"}))
    group, exits = make_group("exit_code.py", "2")
    group.start(assignment())
    assert "earlier" not in group.failure_report(exits.wait()[0]).to_json()["message"]


def test_an_unwritable_log_dir_fails_start_before_any_worker_runs(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cfg = WorkerConfig(entrypoint=str(WORKERS / "hang.py"), args=(), nproc=2, log_dir=str(blocker))
    exits = Exits(1)
    group = WorkerGroup(cfg, on_exit=exits, node_id="node-a")
    with pytest.raises(ConfigError, match="--log-dir"):
        group.start(assignment())
    assert group.pids == [] and not group.running and exits.items == []
    group.stop("nothing to stop")


# -- output: torchrun's routing -----------------------------------------------------------------------------------

ECHO_OUT = "hello stdout\nsecond line\nno newline at end"


def run_to_end(group, exits) -> list[WorkerExit]:
    group.start(assignment())
    done = exits.wait()
    group.stop("done")  # joins the pumps: everything is on the console and in the files now
    return done


def lines_of(text: str, prefix: str) -> list[str]:
    """The console lines with ``prefix`` (lines of different workers interleave; each line stays whole)."""
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_route_is_torchruns_reify():
    assert route(0, 0, True) == (Dest.CONSOLE, Dest.CONSOLE)
    assert route(3, 0, True) == (Dest.FILE, Dest.FILE)
    assert route(0, 3, True) == (Dest.TEE, Dest.TEE)
    assert route(2, 1, True) == (Dest.TEE, Dest.FILE)  # the effective redirect is redirects | tee
    assert route(0, 1, True) == (Dest.TEE, Dest.CONSOLE)
    assert route(0, 0, False) == (Dest.NULL, Dest.NULL)  # a rank outside --local-ranks-filter
    assert route(1, 2, False) == (Dest.FILE, Dest.FILE)  # teed streams go to the file only
    assert line_prefix("trainer", 1, 5) == "[trainer1]:"
    assert line_prefix("trainer", 1, 5, "<${role_name}|${rank}|${local_rank}|${other}> ") == "<trainer|5|1|${other}> "


@COLD_AND_WARM
def test_default_output_reaches_the_console_unprefixed(make_group, tmp_path, capfd, warm):
    group, exits = make_group("echo.py", warm=warm)
    run_to_end(group, exits)
    out, err = capfd.readouterr()
    assert (out, err) == (ECHO_OUT, "hello stderr\n")
    d = rank_dir(tmp_path, 4)
    assert not (d / "stdout.log").exists()
    assert (d / "stderr.log").read_text() == "hello stderr\n"  # kept for failure reports


@COLD_AND_WARM
def test_default_stderr_is_kept_for_the_failure_report(make_group, capfd, warm):
    group, exits = make_group("exit_code.py", "3", warm=warm)
    (ex,) = run_to_end(group, exits)
    _, err = capfd.readouterr()
    assert err == "".join(f"stderr line {i}\n" for i in range(30)) + "about to end with 3\n"
    report = group.failure_report(ex).to_json()
    tail = report["stderr_tail"].splitlines()
    assert len(tail) == 20 and tail[0] == "stderr line 11" and tail[-1] == "about to end with 3"
    assert report["message"].endswith("about to end with 3")


@COLD_AND_WARM
def test_redirects_keep_the_console_clean(make_group, tmp_path, capfd, warm):
    group, exits = make_group("echo.py", nproc=2, redirects=StdSpec(3), warm=warm)
    run_to_end(group, exits)
    assert capfd.readouterr() == ("", "")
    for rank in (4, 5):
        d = rank_dir(tmp_path, rank)
        assert (d / "stdout.log").read_text() == ECHO_OUT
        assert (d / "stderr.log").read_text() == "hello stderr\n"


@COLD_AND_WARM
def test_tee_prefixes_console_lines_and_keeps_plain_logs(make_group, tmp_path, capfd, warm):
    group, exits = make_group("echo.py", nproc=2, tee=StdSpec(3), warm=warm)
    run_to_end(group, exits)
    out, err = capfd.readouterr()
    assert all(line.startswith(("[default0]:", "[default1]:")) for line in (out + err).splitlines())
    for local_rank in (0, 1):
        prefix = f"[default{local_rank}]:"  # torchrun's header: no space after the colon
        assert lines_of(out, prefix) == [prefix + line for line in ECHO_OUT.splitlines()]
        assert lines_of(err, prefix) == [prefix + "hello stderr"]
        d = rank_dir(tmp_path, 4 + local_rank)
        assert (d / "stdout.log").read_text() == ECHO_OUT
        assert (d / "stderr.log").read_text() == "hello stderr\n"


def test_a_per_rank_map(make_group, tmp_path, capfd):
    group, exits = make_group("echo.py", nproc=2, tee=StdSpec.parse("0:3,1:1", "--tee"),
                              redirects=StdSpec.parse("1:2", "--redirects"))
    run_to_end(group, exits)
    out, err = capfd.readouterr()
    assert sorted(out.splitlines()) == sorted(f"[default{r}]:{line}" for r in (0, 1) for line in ECHO_OUT.splitlines())
    assert err == "[default0]:hello stderr\n"  # rank 1's stderr is redirected: its file only
    for rank in (4, 5):
        assert (rank_dir(tmp_path, rank) / "stdout.log").read_text() == ECHO_OUT
        assert (rank_dir(tmp_path, rank) / "stderr.log").read_text() == "hello stderr\n"


def test_role_names_the_prefix_and_the_environment(make_group, tmp_path, capfd):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    group, exits = make_group("record_env.py", str(out_dir), role="trainer", tee=StdSpec(1))
    run_to_end(group, exits)
    assert capfd.readouterr().out == "[trainer0]:recorded rank 4\n"
    assert json.loads((out_dir / "env_4.json").read_text())["env"]["ROLE_NAME"] == "trainer"


def test_the_prefix_template_of_torchrun(make_group, capfd, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", "[${role_name}-${rank}-${local_rank}] ")
    group, exits = make_group("echo.py", tee=StdSpec(2))
    run_to_end(group, exits)
    assert capfd.readouterr() == (ECHO_OUT, "[default-4-0] hello stderr\n")


@pytest.mark.parametrize("tee", [StdSpec(3), StdSpec()])
def test_local_ranks_filter_hides_other_ranks_from_the_console(make_group, tmp_path, capfd, tee):
    group, exits = make_group("echo.py", nproc=2, tee=tee, local_ranks_filter=frozenset({0}))
    run_to_end(group, exits)
    out, err = capfd.readouterr()
    prefix = "[default0]:" if tee.value else ""
    assert out.splitlines() == [prefix + line for line in ECHO_OUT.splitlines()]
    assert err == prefix + "hello stderr\n"
    hidden = rank_dir(tmp_path, 5)
    assert (hidden / "stderr.log").read_text() == "hello stderr\n"
    if tee.value:
        assert (hidden / "stdout.log").read_text() == ECHO_OUT  # teed: the file only
    else:
        assert not (hidden / "stdout.log").exists()  # a console stream: /dev/null, as in torchrun


def test_duplicate_filters_copy_matching_teed_lines(make_group, tmp_path, capfd):
    group, exits = make_group("echo.py", nproc=3, tee=StdSpec(3), local_ranks_filter=frozenset({0, 1}),
                              duplicate_stdout_filters=("second", "no newline"))
    run_to_end(group, exits)
    round_dir = rank_dir(tmp_path, 4).parent
    filtered = (round_dir / "filtered_stdout.log").read_text()
    assert sorted(filtered.splitlines()) == [  # the shown ranks' teed lines only, with their headers
        "[default0]:no newline at end", "[default0]:second line", "[default1]:no newline at end",
        "[default1]:second line"]
    assert not (round_dir / "filtered_stderr.log").exists()
    assert len(capfd.readouterr().out.splitlines()) == 6


def test_duplicate_filters_without_tee_leave_an_empty_file(make_group, tmp_path, capfd):
    group, exits = make_group("echo.py", duplicate_stderr_filters=("hello",))
    run_to_end(group, exits)
    assert (rank_dir(tmp_path, 4).parent / "filtered_stderr.log").read_text() == ""  # torchrun creates it too
    assert capfd.readouterr() == (ECHO_OUT, "hello stderr\n")


def read_until(fd: int, wanted: bytes, timeout: float) -> bytes:
    """Read ``fd`` until ``wanted`` was seen (or end of file, or the timeout); returns all that was read."""
    data, deadline = b"", time.monotonic() + timeout
    while wanted not in data and (remaining := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def test_a_progress_bar_reaches_the_console_before_the_worker_ends(mailbox, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    agent = subprocess.Popen([sys.executable, str(WORKERS / "console_agent.py"), str(tmp_path / "logs"),
                              str(WORKERS / "progress_bar.py")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        conn, _ = mailbox.sock.accept()  # the worker drew its bar and now waits until we close this
        with conn:
            seen = read_until(agent.stderr.fileno(), b"\r", TIMEOUT)
            assert seen == b"progress 50%\r", "a chunk without a newline did not reach the console at once"
        out, err = agent.communicate(timeout=TIMEOUT)
        assert (agent.returncode, out, err) == (0, b"", b"progress 100%\n")
        log = tmp_path / "logs" / "console" / "job_0001" / "stub" / "round_0000" / "rank_0" / "stderr.log"
        assert log.read_bytes() == b"progress 50%\rprogress 100%\n"
    finally:
        agent.kill()
        agent.wait(TIMEOUT)


# -- commands ----------------------------------------------------------------------------------------------


@COLD_AND_WARM
def test_module_entrypoint(make_group, tmp_path, monkeypatch, warm):
    monkeypatch.setenv("PYTHONPATH", str(WORKERS))
    out = tmp_path / "out"
    out.mkdir()
    group, exits = make_group("record_env", str(out), module=True, warm=warm)
    group.start(assignment())
    assert exits.wait()[0].returncode == 0
    argv = json.loads((out / "env_4.json").read_text())["argv"]
    assert argv[0].endswith("record_env.py") and argv[1:] == [str(out)]


def test_no_python_entrypoint(make_group):
    group, exits = make_group("sh", "-c", 'exit $((RANK + 3))', no_python=True)
    group.start(assignment())
    assert exits.wait()[0].returncode == 7


def test_a_worker_that_cannot_start_is_reported_as_failed(make_group, tmp_path):
    group, exits = make_group("no-such-program-here", no_python=True, nproc=2)
    group.start(assignment())
    done = exits.wait()
    assert [(e.returncode, e.pid) for e in done] == [(127, 0), (127, 0)]
    report = group.failure_report(done[0]).to_json()
    assert "could not start 'no-such-program-here'" in report["stderr_tail"]


# -- parent death ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("armed_by", ["setpriv", "preexec"])
def test_a_worker_has_the_parent_death_signal_either_way(make_group, tmp_path, monkeypatch, armed_by):
    """setpriv arms the signal before the worker's program runs (a spawn with no preexec_fn is a vfork); where it
    cannot, a preexec_fn does. Either way the worker is the process Popen started, in its own session."""
    if armed_by == "preexec":
        monkeypatch.setattr(spawn, "_armer", [])  # as where setpriv or dash is missing
    else:
        assert spawn.pdeathsig_argv(os.getpid(), {}) is not None, "setpriv --pdeathsig or dash is not usable here"
    out = tmp_path / "out"
    out.mkdir()
    group, exits = make_group("record_env.py", str(out))
    group.start(assignment())
    (e,) = exits.wait()
    facts = json.loads((out / "env_4.json").read_text())
    assert (facts["pid"], facts["sid"], facts["ppid"], facts["pdeathsig"]) == (e.pid, e.pid, os.getpid(),
                                                                                signal.SIGKILL)
    assert facts["argv"] == [str(WORKERS / "record_env.py"), str(out)]


@pytest.mark.parametrize("pwd, odd", [("/nonexistent/stale", {}), (None, {}),
                                      ("/nonexistent/stale", {"BASH_FUNC_module%%": "() {  :\n}", "a.b": "1"}),
                                      (None, {"IFS": ":", "OPTIND": "4", "PPID": "1"})],
                         ids=["stale-pwd", "no-pwd", "odd-names", "shell-variables"])
def test_the_worker_environment_is_passed_unchanged(make_group, tmp_path, monkeypatch, pwd, odd):
    """dash sets PWD when it starts: the prefix puts it back as the worker's environment has it (torchrun passes a
    stale PWD on, and none where there is none). Names dash would drop (an exported bash function, ``a.b``) or
    variables it resets (IFS, OPTIND, PPID) make the start go the preexec way: the environment arrives either way."""
    if pwd is None:
        monkeypatch.delenv("PWD", raising=False)
    else:
        monkeypatch.setenv("PWD", pwd)
    for name, value in odd.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    out.mkdir()
    group, exits = make_group("record_env.py", str(out))
    group.start(assignment())
    exits.wait()
    env = json.loads((out / "env_4.json").read_text())["env"]
    assert env.get("PWD") == pwd
    expected = worker_env(group.cfg, assignment(), 0, config.worker_base_env(), env["TORCHELASTIC_ERROR_FILE"])
    assert {k: v for k, v in env.items() if k != "ETCD_AGENT_PROGRESS_FILE"} == expected


def test_the_setpriv_prefix_runs_nothing_when_the_parent_is_not_the_one_named(tmp_path):
    """An agent that died before setpriv armed the signal leaves a child whose parent is no longer the agent: the
    prefix exits 1 and never runs the worker's program."""
    marker = tmp_path / "ran"
    prefix = spawn.pdeathsig_argv(os.getpid() + 1_000_000, {})  # not this test's pid: as if reparented
    assert prefix is not None
    done = subprocess.run([*prefix, "touch", str(marker)], env={}, timeout=TIMEOUT)
    assert done.returncode == 1 and not marker.exists()
    ran = subprocess.run([*spawn.pdeathsig_argv(os.getpid(), {}), "/usr/bin/touch", str(marker)], env={},
                         timeout=TIMEOUT)
    assert ran.returncode == 0 and marker.exists()


@pytest.mark.chaos
def test_a_worker_dies_with_its_agent(mailbox, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    agent = subprocess.Popen([sys.executable, str(WORKERS / "parent_agent.py"), str(tmp_path / "logs")], env=env)
    worker = 0
    try:
        ((worker, parent),) = mailbox.ready(1)
        assert parent == agent.pid
        pidfd = os.pidfd_open(worker)
        agent.kill()
        agent.wait(TIMEOUT)
        readable, _, _ = select.select([pidfd], [], [], TIMEOUT)
        os.close(pidfd)
        assert readable, f"worker {worker} outlived its agent"
        assert gone(worker)
    finally:
        agent.kill()
        agent.wait(TIMEOUT)
        kill_quietly([worker] if worker else [])


def test_one_wording_for_an_exit_code_or_a_signal():
    from etcd_agent.proctree import describe_exit

    assert describe_exit(3) == "exit code 3" and describe_exit(0) == "exit code 0"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(-40) == "signal SIG40"  # a real-time signal has no name: still said, never a ValueError
