"""Launcher command lines and process waits shared by the tests, the torchrun comparison and the benchmark.

``agent_command`` is the one way a test or a tool spells an etcd-agent launch on loopback (``AGENT`` plus the
etcd, run, node and size flags); ``TORCHRUN`` is torchrun as ``python -m``. ``Reaper`` waits for a child process on
a thread of its own, so its end is an event with a wall time (to a thread wake-up), not a polling period.
``gone`` and ``gone_within`` look at processes a test did not start (an agent's workers); ``gone_within`` holds
``psutil.Process`` objects and pidfds, so no pid reuse can fool it.

Imports only the standard library, psutil and ``etcd_agent.proctree``; the product never imports this module.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time

import psutil

from etcd_agent import proctree

AGENT = (sys.executable, "-m", "etcd_agent")
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
LOOPBACK = "127.0.0.1"


def agent_flags(endpoint: str, run_id: str, node: str, nnodes: str | int, nproc: int | str) -> list[str]:
    """The flags every loopback agent of a test or a benchmark has: its etcd, run, node id, sizes and address."""
    return ["--etcd-endpoints", endpoint, "--run-id", run_id, "--node-id", node, "--nnodes", str(nnodes),
            "--nproc-per-node", str(nproc), "--local-addr", LOOPBACK]


def agent_command(endpoint: str, run_id: str, node: str, nnodes: str | int, nproc: int | str,
                  extra: list[str] = (), worker: list[str] = ()) -> list[str]:
    """``python -m etcd_agent`` with ``agent_flags``, then ``extra`` flags, then the worker's command line."""
    return [*AGENT, *agent_flags(endpoint, run_id, node, nnodes, nproc), *extra, *worker]


class Reaper:
    """Waits for one ``subprocess.Popen`` on a daemon thread: ``ended`` is set once it exited and was reaped,
    ``ended_at`` is the wall time of the exit (to within a thread wake-up).

    The thread waits on a pidfd taken here, right after the start, and reaps only once the process has ended, so
    ``proc.poll()`` and ``proc.wait(timeout)`` keep working from other threads meanwhile; without pidfds it blocks
    in ``proc.wait()``.
    """

    def __init__(self, proc: subprocess.Popen, name: str = ""):
        self.proc = proc
        self.ended = threading.Event()
        self.ended_at: float | None = None
        try:
            fd: int | None = os.pidfd_open(proc.pid)
        except (OSError, AttributeError):  # no pidfds here, or reaped already by someone's poll()
            fd = None
        threading.Thread(target=self._reap, args=(fd,), name=f"reap-{name or proc.pid}", daemon=True).start()

    def _reap(self, fd: int | None) -> None:
        if fd is not None:
            try:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                poller.poll()
            finally:
                os.close(fd)
            self.ended_at = time.time()
            self.proc.wait()
        else:
            self.proc.wait()
            self.ended_at = time.time()
        self.ended.set()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code once the process ended, or None after ``timeout`` seconds."""
        return self.proc.returncode if self.ended.wait(timeout) else None


def kill_tree(pid: int | None, found: list[psutil.Process] = ()) -> None:
    """SIGKILL a launcher's whole tree: its process group, every descendant (found now, plus ``found``: taken
    earlier, before their parent died) and each descendant's own group (etcd-agent starts each worker in one).
    ``pid`` None: the launcher was reaped already (its number may be another process's now), only ``found`` go.
    Does not reap ``pid``: its owner does."""
    procs = list(found)
    if pid is not None:
        try:
            procs += psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            pass
    for group in ([pid] if pid is not None else []) + [p.pid for p in procs]:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:
        try:
            p.kill()  # psutil refuses a reused pid
        except psutil.Error:
            pass


def gone(pid: int) -> bool:
    """True when ``pid`` has ended (reaped, or a zombie waiting for its parent)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def processes(pids: list[int]) -> list[psutil.Process]:
    """``psutil.Process`` objects for the pids still there (taken now: later pid reuse cannot fool a wait)."""
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return found


def gone_within(procs: list[psutil.Process], timeout: float, what: str = "process(es)") -> float:
    """Seconds until every process has ended (``proctree.wait_gone``: pidfds, no polling); an AssertionError
    naming the survivors after ``timeout``."""
    t0 = time.monotonic()
    left = proctree.wait_gone(procs, t0 + timeout)
    assert not left, f"{len(left)} {what} still alive after {timeout} s: {[p.pid for p in left]}"
    return time.monotonic() - t0
