"""The JSON record files that stand-in workers leave in a directory, and waits that wake when one is written.

Workers of the tests and of the benchmark write one JSON file per start (``write``: a temporary file, then a
rename, so a reader sees a whole record or none). Readers here: ``load`` (every record, in name order) and
``by_round_rank`` (tests/workers/job.py's ``<round>-<rank>.json`` names, keyed by ``(round, rank)``).

Waiting without polling: ``Changes`` is Linux inotify on one directory (through ctypes, no third-party package);
it wakes when a file there is closed after writing, renamed into it or created. ``wait_until`` re-checks a
condition at each such change and, optionally, when one of the given processes ends (a pidfd turns readable), so a
wait ends within a wake-up of the event, not of a polling period. Where inotify is missing (not Linux, no free
watch) the same waits fall back to checking every ``FALLBACK_POLL_S``.

Imports only the standard library; the product never imports this module (it is for tests, tools and workers).
"""

from __future__ import annotations

import json
import os
import select
import time

# Stand-in workers import this module right after their first line, while their peers start on the same CPUs: it
# imports no more than json (ctypes, pathlib and typing only where and when they are needed).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Iterable, TypeVar

    T = TypeVar("T")

IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x2, 0x8, 0x80, 0x100  # IN_MODIFY: a log file grew
IN_ONLYDIR = 0x01000000
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC  # inotify_init1's flags are the open(2) ones
WRITTEN = IN_CLOSE_WRITE | IN_MOVED_TO  # a record is whole: closed after writing, or renamed into place
APPEARED = WRITTEN | IN_CREATE  # also a file created by touch or a directory by mkdir
FALLBACK_POLL_S = 0.25  # only without inotify


def write(path: str | os.PathLike, record: dict) -> None:
    """Write ``record`` as JSON to ``path`` atomically: readers see the whole record or no file."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def load(directory: str | os.PathLike) -> list[dict]:
    """Every ``*.json`` record in ``directory``, in file name order (a file removed meanwhile is skipped)."""
    found = []
    for path in _json_files(directory):
        try:
            with open(path) as f:
                found.append(json.load(f))
        except FileNotFoundError:
            continue
    return found


def _json_files(directory: str | os.PathLike) -> list[str]:
    d = os.fspath(directory)
    return [os.path.join(d, name) for name in sorted(os.listdir(d)) if name.endswith(".json")]


def by_round_rank(directory: str | os.PathLike) -> dict[tuple[int, int], dict]:
    """``(round, rank) -> record`` for records named ``<round>-<rank>.json`` (tests/workers/job.py's)."""
    found = {}
    for path in _json_files(directory):
        rnd, rank = os.path.basename(path)[:-len(".json")].split("-")
        with open(path) as f:
            found[(int(rnd), int(rank))] = json.load(f)
    return found


class Changes:
    """An inotify watch on one directory; ``fileno()`` turns readable after a change of kind ``mask``.

    Make it before the first look at the directory: a change after that look then wakes the waiter, whichever came
    first. ``fileno()`` is None where inotify is unavailable; waits then check every ``FALLBACK_POLL_S``.
    """

    def __init__(self, directory: str | os.PathLike, mask: int = WRITTEN):
        import ctypes

        self._fd: int | None = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError):  # no libc symbol: not Linux
            return
        if fd < 0:
            return  # too many inotify instances: the fallback
        if libc.inotify_add_watch(fd, os.fsencode(directory), mask | IN_ONLYDIR) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            if err in (2, 20):  # ENOENT, ENOTDIR: the caller's mistake, not a missing feature
                raise FileNotFoundError(err, os.strerror(err), os.fspath(directory))
            return  # ENOSPC (no watch left) and the like: the fallback
        self._fd = fd

    def fileno(self) -> int | None:
        return self._fd

    def drain(self) -> None:
        """Forget the changes seen so far (the waiter looks at the directory itself)."""
        if self._fd is None:
            return
        try:
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass

    def wait(self, timeout: float) -> None:
        """Return after the next change (or at once if one is pending), or after ``timeout`` seconds."""
        if self._fd is None:
            time.sleep(min(max(0.0, timeout), FALLBACK_POLL_S))
            return
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.poll(min(max(0.0, timeout), 3600.0) * 1000)  # poll takes an int of milliseconds
        self.drain()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Changes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pidfds(pids: Iterable[int]) -> list[int]:
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            continue  # already reaped: the check sees its exit code
        except (OSError, AttributeError):
            continue  # no pidfds: the check runs at each directory change (and each fallback period)
    return fds


def wait_until(check: Callable[[], T], timeout: float, what: str, directory: str | os.PathLike,
               pids: Iterable[int] = (), mask: int = WRITTEN) -> T:
    """Call ``check`` now and after every change in ``directory`` (and when a process of ``pids`` ends) until it
    returns something truthy, which is returned; an AssertionError naming ``what`` after ``timeout`` seconds.

    ``check`` may itself raise (a process that ended badly, say): that ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    with Changes(directory, mask) as changes:
        ended = _pidfds(pids)
        try:
            poller = select.poll()
            for fd in [changes.fileno(), *ended]:
                if fd is not None:
                    poller.register(fd, select.POLLIN)
            while True:
                value = check()
                if value:
                    return value
                left = deadline - time.monotonic()
                assert left > 0, f"{what} within {timeout} s"
                left = min(left, FALLBACK_POLL_S if changes.fileno() is None else 3600.0)  # poll takes an int of ms
                for fd, _ in poller.poll(left * 1000):
                    if fd == changes.fileno():
                        changes.drain()
                    else:
                        poller.unregister(fd)  # a pidfd stays readable once its process ended: one wake-up
        finally:
            for fd in ended:
                os.close(fd)


def wait_path(path: str | os.PathLike, timeout: float | None = None, tick: Callable[[], None] | None = None,
              tick_s: float = 1.0) -> bool:
    """Wait until ``path`` exists (the event of its creation or rename in its directory); True once it does,
    False after ``timeout``. ``tick`` (a heartbeat, say) is called at least every ``tick_s`` seconds meanwhile."""
    from pathlib import Path

    path = Path(path)
    deadline = None if timeout is None else time.monotonic() + timeout
    with Changes(path.parent, APPEARED) as changes:
        while not path.exists():
            left = tick_s if deadline is None else min(tick_s, deadline - time.monotonic())
            if left <= 0:
                return False
            if tick is not None:
                tick()
            changes.wait(left if tick is not None or deadline is not None else 3600.0)
    return True
