"""This node's training steps: what its workers wrote in their progress files (``progress.beat(step)``), and the
node's step rate over a sliding window.

Guarantees: the node's step is the highest any of its current round's workers reported (data-parallel ranks move
in lockstep, so any one of them stands for the node); reading never raises, and a file that holds no step
(``progress.read_step``: garbled, or written by hand) is ignored with one warning per file. The rate is steps per
second between the oldest and the newest sample of the window (``WINDOW``), over samples taken whenever the
node's step is read; a new round starts a new window (steps start again when a round restarts without a
checkpoint). Thread-safe: the agent's loop reads the step, the publisher's thread (``coord.progress``) samples it.
Imports ``logs`` and ``progress`` only; never ``etcd/`` or ``coord/``.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, Iterable

from .. import logs
from ..progress import read_step

WINDOW = 60.0  # seconds of samples the step rate is measured over


@dataclasses.dataclass(frozen=True)
class Reading:
    """The node's step in ``round`` (None: no worker reported one yet) and its rate (steps/s over the window; 0.0
    until two samples differ in time); ``members``: the size of the round's plan, when the reader knows it (the
    publisher's period grows with it)."""

    round: int
    step: int | None
    rate: float
    members: int = 1


class StepMeter:
    """The node's step and step rate, from ``files()``: the current round and its workers' progress files."""

    def __init__(self, files: Callable[[], tuple[int, Iterable[str]]], log: logs.Log, window: float = WINDOW):
        self._files, self._log, self.window = files, log, window
        self._lock = threading.Lock()
        self._round = 0
        self._samples: collections.deque[tuple[float, int]] = collections.deque()  # (monotonic time, step)
        self._warned: set[str] = set()

    def step(self) -> int | None:
        """The highest step the current round's workers reported (None: none did)."""
        reading = self.sample()
        return reading.step if reading is not None else None

    def sample(self, now: float | None = None) -> Reading | None:
        """Read the files now and note the sample; None while no worker of the round reported a step."""
        rnd, paths = self._files()
        steps = [s for s in (self._read(p) for p in paths) if s is not None]
        now = time.monotonic() if now is None else now
        with self._lock:
            if rnd != self._round:
                self._round, self._samples = rnd, collections.deque()
            if not steps:
                return None
            step = max(steps)
            self._samples.append((now, step))
            while len(self._samples) > 2 and self._samples[0][0] < now - self.window:
                self._samples.popleft()
            return Reading(rnd, step, rate(self._samples))

    def _read(self, path: str) -> int | None:
        try:
            return read_step(path)
        except ValueError as exc:
            if path not in self._warned:
                self._warned.add(path)
                self._log.warning("%s; ignored (beat(step) writes the step as decimal text)", exc)
            return None


def rate(samples) -> float:
    """Steps per second from the oldest to the newest of ``samples`` ((time, step) pairs); 0.0 when they span no time
    or the step went back (a worker restarted its count)."""
    if len(samples) < 2:
        return 0.0
    (t0, s0), (t1, s1) = samples[0], samples[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 >= s0 else 0.0
