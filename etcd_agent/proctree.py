"""Process-tree helpers for the worker group: the parent-death signal, finding every descendant, signalling and
waiting without polling; and ``free_port``, the one way to pick a free TCP port (etcd's ports, the workers' master
port, tests and tools); ``describe_exit``, the one wording of a process's exit code or signal. Safe from pid reuse:
processes are held as ``psutil.Process`` objects, which refuse to signal a reused pid.

A "worker" here is any object with ``pid`` (0 when it never started), ``ps`` (its ``psutil.Process`` or None),
``exited`` (a ``threading.Event`` set once it was reaped) and ``ended_at`` (wall time of that exit, 0 while it runs).
A base module (used by ``etcd.server``, ``node/`` and the tools): imports only the standard library and psutil;
``etcd/server.py`` uses ``pdeathsig_preexec`` for its etcd processes.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Callable

import psutil

_PR_SET_PDEATHSIG = 1



def pdeathsig_preexec(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn that sets PR_SET_PDEATHSIG=SIGKILL; everything it needs is resolved here, in the parent."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    sig = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent_pid:  # the agent died before the signal was armed
            os._exit(1)

    return preexec


def descendants(workers: list) -> dict[int, psutil.Process]:
    """Live descendants of the running workers plus every member of the workers' process groups."""
    found: dict[int, psutil.Process] = {}
    for w in workers:
        if w.ps is not None and not w.exited.is_set():
            try:
                found.update((p.pid, p) for p in w.ps.children(recursive=True))
            except psutil.Error:
                pass
    groups = {w.pid: w for w in workers if w.pid}
    for p in psutil.process_iter() if groups else ():
        try:
            w = groups.get(os.getpgid(p.pid))
            # The pid of a reaped worker can be reused by an unrelated group leader: a process created after
            # our worker ended is not from its group.
            if w is not None and not (w.ended_at and p.create_time() > w.ended_at + 1.0):
                found.setdefault(p.pid, p)
        except (OSError, psutil.Error):
            pass
    for w in workers:  # the workers themselves are waited for by their own threads
        found.pop(w.pid, None)
    return {pid: p for pid, p in found.items() if is_alive(p)}


def is_zombie(p: psutil.Process | None) -> bool:
    try:
        return p is not None and p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def is_alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def signal_all(workers: list, tree: dict[int, psutil.Process], sig: signal.Signals) -> None:
    """Signal the groups of live workers (catching processes forked after the scan) and every process found.

    The group of a worker that already ended is not signalled by id (its number may be reused by now); members
    left in it were found by the scan and get the signal through psutil, which checks for pid reuse.
    """
    for w in workers:
        if w.pid and not w.exited.is_set():
            try:
                os.killpg(w.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
    for p in tree.values():
        try:
            p.send_signal(sig)  # psutil refuses when the pid was reused
        except psutil.Error:
            pass


def wait_gone(procs: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Wait until every process has ended (zombies count as ended) or the deadline; returns the survivors.

    A pidfd becomes readable when its process ends, whoever the parent is, so no polling loop is needed; where
    pidfds are missing (old kernels) psutil's own wait is the fallback.
    """
    fds: dict[int, psutil.Process] = {}
    fallback: list[psutil.Process] = []
    try:
        for p in procs:
            try:
                fd = os.pidfd_open(p.pid)
            except ProcessLookupError:
                continue
            except (OSError, AttributeError):
                fallback.append(p)
                continue
            if is_alive(p):  # checked after taking the pidfd: it cannot refer to a reused pid now
                fds[fd] = p
            else:
                os.close(fd)
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        pending = set(fds)
        while pending and (remaining := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(remaining * 1000):
                poller.unregister(fd)
                pending.discard(fd)
        if fallback:
            _, alive = psutil.wait_procs(fallback, timeout=max(0.0, deadline - time.monotonic()))
            fallback = [p for p in alive if is_alive(p)]
        return [fds[fd] for fd in pending] + fallback
    finally:
        for fd in fds:
            os.close(fd)


_ports_lock = threading.Lock()
_ports_given: set[tuple[str, int]] = set()  # (host, port) handed out by free_port in this process


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago and that this process has not handed out before."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        with _ports_lock:
            if (host, port) not in _ports_given:
                _ports_given.add((host, port))
                return port


def signal_name(signum: int) -> str:
    """``SIGTERM``; ``SIG40`` for a signal without a name (a real-time one)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


def describe_exit(returncode: int) -> str:
    """A process's end as the logs and failure reports say it: ``exit code 3`` or ``signal SIGSEGV`` (a negative
    ``returncode`` is the signal that ended it, as ``subprocess`` reports it)."""
    return f"signal {signal_name(-returncode)}" if returncode < 0 else f"exit code {returncode}"
