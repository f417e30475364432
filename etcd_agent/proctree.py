"""Process-tree helpers: the parent-death signal, finding every descendant, signalling and waiting without polling;
``kill_group``, the one way to signal a process group; ``free_port``, the one way to pick a free TCP port (etcd's
ports, the workers' master port, tests and tools); ``describe_exit``/``signal_name``, the one wording of a process's
exit code or signal (logs, failure reports, health checks). Safe from pid reuse: processes are held as
``psutil.Process`` objects, which refuse to signal a reused pid, and a group is signalled by id only while its
leader is unreaped (the caller's promise, see ``kill_group``).

A "worker" here is any object with ``pid`` (0 when it never started), ``ps`` (its ``psutil.Process`` or None),
``exited`` (a ``threading.Event`` set once it was reaped) and ``ended_at`` (wall time of that exit, 0 while it runs).
A base module (used by ``schema.values``, ``etcd.server``, ``node/`` and the tools): imports only the standard library
and psutil, never anything of the package.
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


def chain_preexec(steps: list) -> Callable[[], None] | None:
    """One preexec_fn that runs ``steps`` in order (None entries skipped; each resolved in the parent); None when
    there is nothing to run."""
    steps = [step for step in steps if step is not None]
    if not steps:
        return None

    def preexec() -> None:
        for step in steps:
            step()

    return preexec


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` to the process group ``pgid`` (a leader started with ``start_new_session``); False when there is
    no such group any more or it is not ours to signal. Call it only while the group's leader is unreaped (its
    ``Popen.poll()`` is None, or its worker's exit not yet seen): until then its pid, the group's id, cannot be
    reused by another process."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def descendants(workers: list) -> dict[int, psutil.Process]:
    """Live descendants of the running workers plus every member of the workers' process groups.

    One pass over /proc (each process's parent and group from its stat line) finds them; psutil handles are made
    for those alone. (psutil's ``children`` reads every process once per worker, and a group scan once more: three
    passes over the machine's processes for two workers, twice per stop.)"""
    table = _proc_table()
    if table is None:
        return _descendants_psutil(workers)
    groups = {w.pid: w for w in workers if w.pid}
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    below: set[int] = set()
    stack = [w.pid for w in workers if w.ps is not None and not w.exited.is_set()]
    while stack:
        for child in kids.get(stack.pop(), ()):
            if child not in below:
                below.add(child)
                stack.append(child)
    found: dict[int, psutil.Process] = {}
    for pid, (_, pgrp) in table.items():
        w = groups.get(pgrp)
        if pid in groups or (pid not in below and w is None):
            continue  # the workers themselves are waited for by their own threads
        try:
            p = psutil.Process(pid)
            # The pid of a reaped worker can be reused by an unrelated group leader: a process created after
            # our worker ended is not from its group (a descendant of a running worker is ours whatever its group).
            if pid in below or not (w.ended_at and p.create_time() > w.ended_at + 1.0):
                found[pid] = p
        except psutil.Error:
            pass
    return {pid: p for pid, p in found.items() if is_alive(p)}


def _proc_table() -> dict[int, tuple[int, int]] | None:
    """pid -> (parent pid, process group) of every process, from /proc/PID/stat; None without a readable /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    table = {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split(None, 3)  # state, ppid, pgrp, the rest
            table[int(name)] = (int(fields[1]), int(fields[2]))
        except (OSError, ValueError, IndexError):  # it ended meanwhile
            pass
    return table or None


def _descendants_psutil(workers: list) -> dict[int, psutil.Process]:
    """``descendants`` through psutil alone, where /proc cannot be read."""
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
            if w is not None and not (w.ended_at and p.create_time() > w.ended_at + 1.0):
                found.setdefault(p.pid, p)
        except (OSError, psutil.Error):
            pass
    for w in workers:
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
            kill_group(w.pid, sig)
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


def describe_exit(returncode: int | None, signal_named: str | None = None) -> str:
    """A process's end as the logs and failure reports say it: ``exit code 3`` or ``signal SIGSEGV`` (a negative
    ``returncode`` is the signal that ended it, as ``subprocess`` reports it; ``signal_named``, a signal's name as a
    report recorded it, is used as given)."""
    if signal_named:
        return f"signal {signal_named}"
    if returncode is None:
        return "an unknown exit status"
    return f"signal {signal_name(-returncode)}" if returncode < 0 else f"exit code {returncode}"
