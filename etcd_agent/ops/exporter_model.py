"""The exporter's in-memory model of the runs under a root, and each run's current job as the numbers it exports.

Guarantees:

- ``Model`` holds, per run, every key of the schema under the run prefix as last read or watched (the c10d store's
  keys are never kept), and the values of each job's ``P/round`` key that it saw (its history: a round's opening
  and closing, the round a restart opened). ``reset`` replaces what a range held with a read; ``apply`` takes a
  watch delivery; both are idempotent, so a replayed event changes nothing.
- ``job_view(run, now)`` derives the current job's state from the model alone, with no I/O: phase, result, round,
  restarts, node counts, quarantined nodes, world size, round formation time, last restart time, last failure's
  cause, the training step (minimum and maximum over nodes), steps per second and the stragglers
  (``coord.progress``). A value that does not fit the schema leaves its own numbers out, never the rest.
- An ended job's run drops out ``retention`` seconds after its result's time (``expired``).

Pure but for a lock: imports the base modules, ``schema/``, ``etcd.client`` (the KV record), ``coord.blame`` and
``coord.progress``;
never ``node/``, the agent or prometheus_client.
"""

from __future__ import annotations

import dataclasses
import threading

from ..coord.abandon import ABANDONED
from ..coord.blame import root_cause
from ..coord.progress import summarize
from ..errors import BadKeyData
from ..etcd.client import KV
from ..schema.keys import Keys, RunKeys
from ..schema.values import (Failure, JobPointer, NodeInfo, Phase, Plan, PlanPart, Progress, Quarantine, Restarts,
                             Result, RoundInfo, SpecValue)

HISTORY = 64  # round values a run keeps (newest first): enough for the current round and the last restart
CAUSES = ("exit", "signal", "hang", "lost", "group", "other")  # the bounded set of a failure's cause class


def cause_class(f: Failure) -> str:
    """A failure report's cause as one word of ``CAUSES``."""
    if f.lost:
        return "lost"
    if f.hang:
        return "hang"
    if f.signal:
        return "signal"
    if f.exitcode is not None:
        return "exit"
    return "group" if f.rank is None else "other"


@dataclasses.dataclass
class RunModel:
    """One run: its keys (``key -> KV``) and the round values seen, ``(generation, revision) -> RoundInfo``."""

    run: RunKeys
    kvs: dict[str, KV] = dataclasses.field(default_factory=dict)
    rounds: dict[tuple[int, int], RoundInfo] = dataclasses.field(default_factory=dict)

    def generation(self) -> int | None:
        kv = self.kvs.get(self.run.job())
        try:
            return JobPointer.from_kv(kv).gen if kv is not None else None
        except BadKeyData:
            return None

    def note_round(self, gen: int, kv: KV) -> None:
        try:
            self.rounds[(gen, kv.mod_revision)] = RoundInfo.from_kv(kv)
        except BadKeyData:
            return
        if len(self.rounds) > HISTORY:
            for old in sorted(self.rounds)[:len(self.rounds) - HISTORY]:
                del self.rounds[old]


@dataclasses.dataclass(frozen=True)
class JobView:
    """The numbers one run's current job exports."""

    run: str
    gen: int
    phase: str  # forming, running or ended
    outcome: str | None = None
    abandoned: bool = False  # ended stopped because no agent was left (coord/abandon.py)
    ended_at: float | None = None
    round: int | None = None
    restarts_used: int | None = None
    restarts_max: int | None = None
    alive: int = 0
    planned: int = 0
    waiting: int = 0
    spares: int = 0
    quarantined: tuple[str, ...] = ()
    world_size: int | None = None
    formation_s: float | None = None
    last_restart: float | None = None
    last_failure: str | None = None
    problems: int = 0
    step_min: int | None = None  # the newest round's training step, over the nodes that report one
    step_max: int | None = None
    steps_per_second: float | None = None  # the median of the nodes' step rates
    stragglers: tuple[str, ...] = ()  # nodes slower than the median by more than --straggler-threshold
    stalled: int | None = None  # restarts in a row without a new step (--max-no-progress-restarts; None: off)


PHASES = ("forming", "running", "ended")


class Model:
    """Every run under ``root`` that the exporter follows; changed on one thread, read by scrapes on others."""

    def __init__(self, root: str):
        self.root = root
        self.lock = threading.Lock()
        self.runs: dict[str, RunModel] = {}
        self.revision = 0

    def run_of(self, key: str) -> tuple[RunModel, Keys | None] | None:
        """The run ``key`` lies in and the job prefix it lies under (None: the pointer); None for a key the model
        does not keep (outside a run, the c10d store)."""
        prefix = self.root + "/"
        if not key.startswith(prefix):
            return None
        run_id, slash, _ = key[len(prefix):].partition("/")
        if not slash or not run_id:
            return None
        rm = self.runs.get(run_id)
        if rm is None:
            rm = self.runs[run_id] = RunModel(RunKeys(self.root, run_id))
        gen = rm.run.generation_of(key)
        keys = rm.run.generation(gen) if gen is not None else None
        if keys is not None and key.startswith(keys.stores()):
            return None
        if keys is None and key != rm.run.job():
            return None
        return rm, keys

    def reset(self, prefix: str, kvs: list[KV], revision: int) -> None:
        """What the range under ``prefix`` holds, as read at ``revision``: it replaces what the model had there."""
        with self.lock:
            for rm in self.runs.values():
                for key in [k for k in rm.kvs if k.startswith(prefix)]:
                    del rm.kvs[key]
            for kv in kvs:
                self._put(kv)
            self.runs = {r: rm for r, rm in self.runs.items() if rm.kvs}
            self.revision = max(self.revision, revision)

    def apply(self, events) -> None:
        """A watch delivery (``etcd.watch.Event`` list), in revision order."""
        with self.lock:
            for ev in events:
                if ev.kind == "put":
                    self._put(ev.kv)
                else:
                    found = self.run_of(ev.key)
                    if found is not None:
                        found[0].kvs.pop(ev.key, None)
                self.revision = max(self.revision, ev.kv.mod_revision)

    def _put(self, kv: KV) -> None:
        found = self.run_of(kv.key)
        if found is None:
            return
        rm, keys = found
        rm.kvs[kv.key] = kv
        if keys is not None and kv.key == keys.round():
            rm.note_round(keys.gen, kv)

    def note_round(self, run_id: str, gen: int, kv: KV) -> None:
        """An earlier value of the run's round key (read at an older revision): history the watch did not see."""
        with self.lock:
            rm = self.runs.get(run_id)
            if rm is not None:
                rm.note_round(gen, kv)

    def views(self, now: float, retention: float) -> list[JobView]:
        """The current job of every run that has one, but those that ended more than ``retention`` s before
        ``now``."""
        with self.lock:
            found = [job_view(rm, now) for rm in self.runs.values()]
        return [v for v in found if v is not None and not expired(v, now, retention)]


def expired(view: JobView, now: float, retention: float) -> bool:
    return view.phase == "ended" and view.ended_at is not None and now - view.ended_at > retention


def job_view(rm: RunModel, now: float) -> JobView | None:
    """The current job of ``rm`` as ``JobView`` (None: the run has no readable job pointer)."""
    gen = rm.generation()
    if gen is None:
        return None
    k, problems = rm.run.generation(gen), []

    def read(key: str, record):
        kv = rm.kvs.get(key)
        try:
            return record.from_kv(kv) if kv is not None else None
        except BadKeyData:
            problems.append(key)
            return None

    rnd, result = read(k.round(), RoundInfo), read(k.result(), Result)
    restarts, spec = read(k.restarts(), Restarts), read(k.spec(), SpecValue)
    plan = _plan(rm, k, rnd.number, read, problems) if rnd else None
    nodes = [info for key in _under(rm, k.nodes()) if rm.kvs[key].lease and (info := read(key, NodeInfo))]
    members = set(plan.nodes) if plan else set()
    quarantined = tuple(sorted(q.node or key[len(k.quarantines()):] for key in _under(rm, k.quarantines())
                               if (q := read(key, Quarantine)) is not None and q.sitting_out(now)))
    steps = [p for key in _under(rm, k.progresses()) if (p := read(key, Progress)) is not None]
    progress = summarize(steps, None, spec.straggler_threshold or 0.0 if spec else 0.0)
    ended = result is not None or (rnd is not None and rnd.phase.final)
    phase = "ended" if ended else "running" if rnd is not None and rnd.phase == Phase.RUNNING else "forming"
    return JobView(
        rm.run.run_id, gen, phase, outcome=result.outcome.value if result else (rnd.phase.value if ended else None),
        abandoned=bool(result and result.reason.startswith(ABANDONED)),
        ended_at=(result.time or None) if result else (rnd.time or None) if ended else None,
        round=rnd.number if rnd else None, restarts_used=restarts.used if restarts else None,
        restarts_max=restarts.max if restarts else spec.max_restarts if spec else None,
        alive=len(nodes), planned=len(members), spares=sum(1 for n in nodes if n.spare and n.node not in members),
        waiting=sum(1 for n in nodes if not n.spare and n.node not in members), quarantined=quarantined,
        world_size=plan.world_size if plan else None, formation_s=_formation(rm, gen, rnd),
        last_restart=_last_restart(rm, gen, restarts), last_failure=_last_failure(rm, k, read),
        problems=len(problems), step_min=progress and progress.min_step, step_max=progress and progress.max_step,
        steps_per_second=progress and progress.rate, stragglers=tuple(n for n, _ in progress.stragglers) if progress
        else (), stalled=(restarts.stalled or 0) if restarts and restarts.stall_limit else None)


def _plan(rm: RunModel, k: Keys, number: int, read, problems: list) -> Plan | None:
    """Round ``number``'s whole plan: its header with every part (``schema/plan.py``); None if it is bad data."""
    header = read(k.plan(number), Plan)
    if header is None:
        return None
    parts = [read(key, PlanPart) for key in _under(rm, k.plan(number) + "/")]
    try:
        return header.with_parts(k.plan(number), [p for p in parts if p is not None])
    except BadKeyData:
        problems.append(k.plan(number))
        return None


def _under(rm: RunModel, prefix: str) -> list[str]:
    return sorted(key for key in rm.kvs if key.startswith(prefix))


def _formation(rm: RunModel, gen: int, rnd: RoundInfo | None) -> float | None:
    """Seconds from the round's opening (its round value while joining) to its close (the value that says it runs,
    written with its plan): ``status``'s "formed in". None until the round closed, or when its opening was not seen
    (compacted away before the exporter read it)."""
    if rnd is None or rnd.phase == Phase.JOINING:
        return None
    seen = [(rev, r) for (g, rev), r in rm.rounds.items() if g == gen and r.number == rnd.number]
    opened = [r.time for _rev, r in seen if r.phase == Phase.JOINING and r.time]
    closed = [r.time for _rev, r in seen if r.phase == Phase.RUNNING and r.time]
    if not opened or not closed:
        return None
    return max(0.0, min(closed) - max(opened))


def _last_restart(rm: RunModel, gen: int, restarts: Restarts | None) -> float | None:
    """When the last restart was counted: the time of the round value written in the same txn (``txns.bump``)."""
    if restarts is None or not restarts.used:
        return None
    rnd = rm.rounds.get((gen, restarts.mod_revision))
    return (rnd.time or None) if rnd is not None else None


def _last_failure(rm: RunModel, k: Keys, read) -> str | None:
    """The cause class of the newest round with failure reports (``blame.root_cause`` picks the round's cause)."""
    by_round: dict[int, list[Failure]] = {}
    for key in _under(rm, k.rounds()):
        try:
            parsed = k.parse(key)
        except BadKeyData:
            continue
        if parsed.kind == "failure" and (report := read(key, Failure)) is not None:
            by_round.setdefault(parsed.round, []).append(report)
    if not by_round:
        return None
    cause = root_cause(by_round[max(by_round)])
    return cause_class(cause) if cause is not None else None
