"""Shared by the test_workers*.py modules: a WorkerGroup of tiny plain-Python workers from tests/workers/, the
records of its exits, and a Unix-socket mailbox the workers write to.

A pytest plugin (each module names it in ``pytest_plugins``) for the fixtures ``make_group`` and ``mailbox``. Every
wait is on an event (exit callbacks, the mailbox, pidfds), never a sleep.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

from etcd_agent import config
from etcd_agent.config import WorkerConfig
from etcd_agent.node.warm import SparePool
from etcd_agent.node.api import Assignment, WorkerExit
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
