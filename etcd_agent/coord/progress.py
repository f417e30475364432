"""Training progress in etcd: each agent publishes its node's latest step and step rate (``P/progress/<node>``), and
readers (``status``, ``events``, the exporter) sum the job up from those keys: its step (the minimum and maximum
over nodes), its steps per second (the median of the nodes' rates) and its stragglers.

Write cost, the bound: one put per node at most every ``period(members)`` seconds, and only when the node's step
changed since its last put: ``max(MIN_PERIOD, members / JOB_PUTS_PER_SECOND)``, so a job of any size writes at most
``JOB_PUTS_PER_SECOND`` progress puts per second (every 5 s per node up to 500 nodes; every 100 s at 10,000 nodes,
0.6 puts per node per minute). The bound is set by etcd's history more than its CPU: every put is a revision, and
100 per second are 360,000 an hour (``docs/scale-model.md``). No agent watches these keys, so a put costs etcd one
write and no watch event but the exporter's and a following ``events``. Each key is bound to the node's session
lease: a lost node's step vanishes with it. The publisher's thread starts once the node runs workers with progress
files (``Coordinator.maintain``): stand-in workers and torchrun's never start it. The thread sleeps until a put
can be due, then reads the step locally every ``TICK`` (files only, no etcd) until it changed; the rate is
measured over the node's readings (``node.steps``), not from the puts.

A straggler is a node whose rate is below the job's median rate by more than ``threshold`` (a fraction:
``--straggler-threshold 0.2`` names nodes more than 20% slower than the median); nothing is restarted for it.

Imports the base modules, ``schema/`` and ``etcd/``; never ``node/`` (the agent hands in the node's reading).
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from typing import Callable, Iterable, Protocol

from .. import logs
from ..errors import AgentError
from ..etcd.client import Etcd
from ..schema.values import Progress

log = logs.get("etcd_agent.coord.progress")
TICK = 1.0  # seconds between local readings of the step (no etcd traffic)
MIN_PERIOD = 5.0  # seconds: no node puts its step more often than this
JOB_PUTS_PER_SECOND = 100  # the bound on a whole job's progress puts per second (the period grows with the job)


def period(members: int) -> float:
    """Seconds between two puts of one node's progress, for a job of ``members`` nodes."""
    return max(MIN_PERIOD, members / JOB_PUTS_PER_SECOND)


class Sample(Protocol):
    """What the agent hands the publisher (``node.steps.Reading``): the node's step in ``round`` (None: not reported
    yet), its rate (steps/s), and the size of the round's plan (the period grows with it)."""

    round: int
    step: int | None
    rate: float
    members: int


class Publisher:
    """A thread that puts ``Progress`` at ``key`` on the session's lease, at the bounded rate (module doc)."""

    def __init__(self, etcd: Etcd, key: str, node: str, lease: Callable[[], int], sample: Callable[[], Sample | None],
                 where: logs.Where | None = None):
        self.etcd, self.key, self.node, self._lease, self._sample = etcd, key, node, lease, sample
        self.log = log.bound(where)
        self._stop = threading.Event()
        self._last: tuple[int, int] | None = None  # (round, step) put last
        self._last_at = 0.0  # monotonic time of that put (0: none yet)
        self.puts = 0
        self._due = 0.0  # monotonic time before which no put can be due: the thread sleeps until then
        self._thread = threading.Thread(target=self._run, name="progress-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(max(TICK, self._due - time.monotonic())):
            try:
                self.tick(time.monotonic(), started)
            except AgentError as exc:  # etcd away, or the session just ended: the next tick tries again
                self.log.debug("could not publish this node's progress: %s", exc)
            except Exception:  # noqa: BLE001 - progress is a report: it never ends the agent
                self.log.exception("publishing this node's progress failed")

    def tick(self, now: float, started: float = 0.0) -> bool:
        """Read the node's step; put it when it changed and the period since the last put (or the start) is over."""
        s = self._sample()
        if s is not None:
            self._due = (self._last_at or started) + period(s.members)
        if s is None or s.step is None or (s.round, s.step) == self._last or now < self._due:
            return False
        lease = self._lease()
        if not lease:
            return False
        self.etcd.put(self.key, Progress(self.node, s.round, s.step, round(s.rate, 3), time.time()).encode(), lease)
        self._last, self._last_at = (s.round, s.step), now
        self._due = now + period(s.members)
        self.puts += 1
        return True


@dataclasses.dataclass(frozen=True)
class JobProgress:
    """The job's progress in ``round``, from its nodes' records: step range, median rate, stragglers (node, rate)."""

    round: int
    nodes: int
    min_step: int
    max_step: int
    rate: float
    stragglers: tuple[tuple[str, float], ...] = ()

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "stragglers": [{"node": n, "rate": r} for n, r in self.stragglers]}

    @classmethod
    def from_json(cls, d: dict) -> JobProgress:
        return cls(d["round"], d["nodes"], d["min_step"], d["max_step"], d["rate"],
                   tuple((s["node"], s["rate"]) for s in d.get("stragglers", ())))

    def describe(self) -> str:
        steps = f"step {self.min_step}" if self.min_step == self.max_step else \
            f"step {self.min_step}-{self.max_step}"
        slow = "; stragglers: " + ", ".join(f"{n} ({r:.3g} steps/s)" for n, r in self.stragglers) \
            if self.stragglers else ""
        return f"{steps} ({self.rate:.3g} steps/s, median of {self.nodes} node(s)){slow}"


def summarize(records: Iterable[Progress], rnd: int | None = None, threshold: float = 0.0) -> JobProgress | None:
    """The job's progress in round ``rnd`` (None: the newest round any node reported), or None when no node
    reported a step there. ``threshold`` > 0 names the stragglers (module doc)."""
    records = list(records)
    if rnd is None:
        rnd = max((p.round for p in records), default=None)
    current = [p for p in records if p.round == rnd]
    if not current:
        return None
    median = statistics.median(p.rate for p in current)
    return JobProgress(rnd, len(current), min(p.step for p in current), max(p.step for p in current), median,
                       stragglers(current, median, threshold))


def stragglers(records: list[Progress], median: float, threshold: float) -> tuple[tuple[str, float], ...]:
    """The nodes whose rate is below ``median`` by more than ``threshold`` (a fraction), slowest first; none when the
    threshold is 0 (off) or fewer than two nodes report."""
    if threshold <= 0 or len(records) < 2 or median <= 0:
        return ()
    slow = [p for p in records if p.rate < median * (1 - threshold)]
    return tuple((p.node, p.rate) for p in sorted(slow, key=lambda p: (p.rate, p.node)))
