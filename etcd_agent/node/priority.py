"""CPU and I/O priority of a process (Linux): the lowest for a warm spare, and back to the agent's at its handoff.

*Lowest* is three settings, made in the child between fork and exec (``idle_preexec``), so the process never runs
a line of its own above them: the ``SCHED_IDLE`` scheduling policy, the idle I/O class (``ioprio_set``), and, where
the kernel groups processes by session (``/proc/<pid>/autogroup``: a spare has a session of its own, and an autogroup
competes with the others at full weight however idle its tasks are), its autogroup's nice 19. The threads a process
starts inherit the first two.

``restore`` gives every thread of a process the caller's own policy, nice and I/O priority, and its autogroup the
nice a new session starts with (0, what a cold worker's has), then reads them back; OSError when any of it did not
hold. The kernel lets a process leave ``SCHED_IDLE`` only with CAP_SYS_NICE or an RLIMIT_NICE that would allow its
nice value (``can_nice``): ``probe`` finds out once whether this process may, on a thread of its own.

Imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import resource
import threading
from dataclasses import dataclass
from typing import Callable

IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_SHIFT = 13
IOPRIO_CLASS_IDLE = 3
IDLE_IOPRIO = IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT
AUTOGROUP_IDLE_NICE = 19
AUTOGROUP_NEW_NICE = 0  # the nice of the autogroup a new session gets
_SYSCALLS = {"x86_64": (251, 252), "amd64": (251, 252), "aarch64": (30, 31), "arm64": (30, 31)}  # set, get
_LINUX = hasattr(os, "SCHED_IDLE") and os.path.isdir("/proc/self/task")
_RESTORE_TRIES = 10


@dataclass(frozen=True)
class Priority:
    policy: int
    sched_priority: int
    nice: int
    ioprio: int | None  # None: no ioprio syscall known on this machine


def _syscall() -> Callable[..., int] | None:
    if not _LINUX or _NUMS is None:
        return None
    fn = ctypes.CDLL(None, use_errno=True).syscall
    fn.restype = ctypes.c_long
    return fn


_NUMS = _SYSCALLS.get(platform.machine().lower())  # resolved here: a preexec_fn must not look anything up
_SYS = _syscall()


def ioprio_get(tid: int) -> int | None:
    """The I/O priority of a thread (``class << 13 | data``); None where there is no ioprio syscall."""
    if _SYS is None:
        return None
    value = _SYS(_NUMS[1], IOPRIO_WHO_PROCESS, tid)
    if value < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioprio_get({tid}): {os.strerror(err)}")
    return int(value)


def ioprio_set(tid: int, value: int) -> None:
    if _SYS is None:
        return
    if _SYS(_NUMS[0], IOPRIO_WHO_PROCESS, tid, value) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioprio_set({tid}, {value:#x}): {os.strerror(err)}")


def own() -> Priority:
    """The calling thread's priority: what a worker it spawns cold inherits."""
    policy = os.sched_getscheduler(0) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
    return Priority(policy, os.sched_getparam(0).sched_priority, os.getpriority(os.PRIO_PROCESS, 0), ioprio_get(0))


def autogroup_nice(pid: int) -> int | None:
    """The nice of ``pid``'s autogroup; None where the kernel has no autogroups."""
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            return int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def _set_autogroup(pid: int | str, nice: int) -> None:
    fd = os.open(f"/proc/{pid}/autogroup", os.O_WRONLY)
    try:
        os.write(fd, str(nice).encode())
    finally:
        os.close(fd)


def idle_preexec() -> Callable[[], None] | None:
    """A preexec_fn that puts the new process at the lowest priority; run it after setsid (Popen's
    ``start_new_session`` does it first), so the autogroup it lowers is the new session's own. A setting the
    kernel refuses is left as it was: ``restore`` is then a no-op for it."""
    if not _LINUX:
        return None
    autogroups = os.path.exists("/proc/self/autogroup")

    def preexec() -> None:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        with contextlib.suppress(OSError):
            ioprio_set(0, IDLE_IOPRIO)
        if autogroups:
            with contextlib.suppress(OSError):
                _set_autogroup("self", AUTOGROUP_IDLE_NICE)

    return preexec


def threads(pid: int) -> list[int]:
    """The thread ids of ``pid``, its main thread first; ProcessLookupError when it is gone."""
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError as exc:
        raise ProcessLookupError(f"pid {pid} is gone") from exc
    return [pid] + [t for t in tids if t != pid]


def restore_thread(tid: int, prio: Priority) -> None:
    """Give one thread ``prio`` and check that it holds; OSError naming what did not."""
    os.sched_setscheduler(tid, prio.policy, os.sched_param(prio.sched_priority))
    if os.getpriority(os.PRIO_PROCESS, tid) != prio.nice:
        os.setpriority(os.PRIO_PROCESS, tid, prio.nice)
    if prio.ioprio is not None:
        ioprio_set(tid, prio.ioprio)
    policy = os.sched_getscheduler(tid) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
    got = (policy, os.getpriority(os.PRIO_PROCESS, tid), ioprio_get(tid) if prio.ioprio is not None else None)
    if got != (prio.policy, prio.nice, prio.ioprio):
        raise OSError(f"thread {tid} has policy {got[0]}, nice {got[1]}, I/O priority {got[2]} after it was given "
                      f"policy {prio.policy}, nice {prio.nice}, I/O priority {prio.ioprio}")


def restore(pid: int, prio: Priority) -> None:
    """Give every thread of ``pid`` ``prio`` and its autogroup a new session's nice; threads it starts meanwhile
    are found by listing them again until no new one appears. OSError (ProcessLookupError when it is gone)."""
    if not _LINUX:
        return
    if autogroup_nice(pid) not in (None, AUTOGROUP_NEW_NICE):
        _set_autogroup(pid, AUTOGROUP_NEW_NICE)
        if autogroup_nice(pid) != AUTOGROUP_NEW_NICE:
            raise OSError(f"the autogroup of pid {pid} kept nice {autogroup_nice(pid)}")
    done: set[int] = set()
    for _ in range(_RESTORE_TRIES):
        new = [t for t in threads(pid) if t not in done]
        if not new:
            return
        for tid in new:
            try:
                restore_thread(tid, prio)
            except ProcessLookupError:
                if tid == pid:
                    raise
            done.add(tid)
    raise OSError(f"pid {pid} kept starting threads while its priority was restored")


def probe() -> str:
    """"" when this process may give a thread at the lowest priority its own priority back; else why not."""
    if not _LINUX:
        return "SCHED_IDLE is Linux only"
    prio = own()
    result: list[str] = []
    lowered, done = threading.Event(), threading.Event()

    def target() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            ioprio_set(0, IDLE_IOPRIO)
        except OSError as exc:
            result.append(f"SCHED_IDLE could not be set: {exc}")
        lowered.set()
        done.wait(10)

    thread = threading.Thread(target=target, name="etcd-agent-priority-probe", daemon=True)
    thread.start()
    try:
        lowered.wait(10)
        if not result:
            try:
                restore_thread(thread.native_id, prio)
            except OSError as exc:
                result.append(_why(exc, prio))
    finally:
        done.set()
        thread.join(10)
    return result[0] if result else ""


def _why(exc: OSError, prio: Priority) -> str:
    """The reason a restore failed, with what the kernel would need."""
    if exc.errno == 1:  # EPERM: can_nice
        soft, _hard = resource.getrlimit(resource.RLIMIT_NICE) if hasattr(resource, "RLIMIT_NICE") else (0, 0)
        return (f"leaving SCHED_IDLE needs CAP_SYS_NICE or an RLIMIT_NICE of at least {20 - prio.nice} "
                f"(ulimit -e; it is {soft}): {exc.strerror}")
    return f"the priority of a thread at SCHED_IDLE could not be given back: {exc}"
