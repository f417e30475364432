"""``etcd-agent events --plot FILE``: a job's history as a picture, one row per node, time across.

``layout`` turns the entries ``events.replay`` emits into drawable items and does no I/O: per node the bars of each
round it joined (forming: from its join to the plan; running: from the plan to its exit, its failure, its loss or
the round's end; stopped: from there to its next join, or until its registration is gone), the thin line of its
registration (lease held), markers for failures (with rank and cause), lost nodes, quarantines and spare takeovers
(a newcomer in a plan in the place of a member of the previous plan that is not in it), a vertical line per
restart counted, the rounds as shaded spans, and the result in the title. ``draw`` renders that with matplotlib's
Agg canvas, PNG or SVG by the file's suffix (SVG keeps its text as text).

A change that has no time of its own (a deleted key: a node whose lease ran out) is placed at the time of the next
change that has one (etcd noticed the loss before it), else of the last one: so a loss shows where the job saw it.

matplotlib is an optional extra (``pip install 'etcd-agent[plot]'``); only ``draw`` imports it, so nothing else of
the agent or the command line ever does. Imports ``ops.events`` (the replay), ``coord.txns`` and the base modules;
never ``node/`` or the agent.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ..errors import ConfigError

FORMATS = {".png": "png", ".svg": "svg"}
EXTRA = "pip install 'etcd-agent[plot]'"
FORMING, RUNNING, STOPPED = "forming", "running", "stopped"
FAILURE, LOST, QUARANTINED, TAKEOVER = "failure", "lost", "quarantined", "spare takeover"
LABEL_WIDTH = 60  # characters of a marker's text; the rest is in ``etcd-agent events``


@dataclasses.dataclass(frozen=True)
class Bar:
    node: str
    round: int
    state: str  # FORMING, RUNNING or STOPPED
    start: float  # seconds from the job's start
    end: float


@dataclasses.dataclass(frozen=True)
class Mark:
    node: str
    kind: str  # FAILURE, LOST, QUARANTINED or TAKEOVER
    at: float
    text: str


@dataclasses.dataclass(frozen=True)
class Restart:
    at: float
    text: str  # "restart 1 of 3"


@dataclasses.dataclass(frozen=True)
class Span:
    label: str  # "round 2", or the node whose registration it is
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class Timeline:
    title: str
    start_wall: float | None  # the wall time of second 0 (None: the history has no time at all)
    end: float  # seconds from the start to the last change
    rows: tuple[str, ...]  # the nodes, top to bottom
    bars: tuple[Bar, ...]
    marks: tuple[Mark, ...]
    restarts: tuple[Restart, ...]
    rounds: tuple[Span, ...]
    registered: tuple[Span, ...]  # per node: from its registration until it was gone


def file_format(path: str) -> str:
    """``png`` or ``svg`` by the suffix of ``path``; anything else is a ConfigError naming the flag."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(f"--plot {path}: the picture is written as PNG or SVG, by its suffix (.png or .svg)")
    return fmt


def _natural(node: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", node)]


def times(entries: list[dict]) -> list[float | None]:
    """Each entry's wall time: its own, else the next entry's that has one, else the last one's before it."""
    out: list[float | None] = [e.get("time") or None for e in entries]
    later = None
    for i in range(len(out) - 1, -1, -1):
        out[i] = later = out[i] or later
    earlier = None
    for i, t in enumerate(out):
        out[i] = earlier = t or earlier
    return out


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= LABEL_WIDTH else text[:LABEL_WIDTH - 1] + "\u2026"


def title(entries: list[dict], run_id: str, job: int | None) -> str:
    """``run R, job G: succeeded in round 3 · restarts 2 of 3 used`` (no result yet: the round it is in)."""
    result = next((e for e in reversed(entries) if e["event"] == "result"), None)
    rounds = [e["round"] for e in entries if e["event"] == "round opened"]
    if result is not None:
        outcome = f"{result['outcome']} in round {result['round']}"
    else:
        outcome = f"no result yet (round {rounds[-1]})" if rounds else "no result yet"
    counted = [e for e in entries if e["event"] == "restart counted"]
    used = f"restarts {counted[-1]['used']} of {counted[-1]['max']} used" if counted else "no restart used"
    compacted = " (history compacted: the oldest changes are gone)" if any(
        e["event"] == "history compacted" for e in entries) else ""
    return f"run {run_id}" + (f", job {job}" if job else "") + f": {outcome} \u00b7 {used}{compacted}"


class _Walk:
    """The state ``layout`` gathers in one pass over the history (times in seconds from the start)."""

    def __init__(self, end: float):
        self.end = end
        self.opened: dict[int, float] = {}  # round -> when it opened
        self.closed: dict[int, float] = {}  # round -> its plan
        self.ended: dict[int, float] = {}  # round -> when the next one opened, or the job ended
        self.members: dict[int, list[str]] = {}
        self.joined: dict[tuple[int, str], float] = {}
        self.stopped: dict[tuple[int, str], float] = {}  # (round, node) -> its exit, failure or loss
        self.alive: dict[str, list[float]] = {}  # node -> [registered, gone]
        self.marks: list[Mark] = []
        self.restarts: list[Restart] = []

    def stop(self, rnd: int, node: str, at: float) -> None:
        self.stopped[(rnd, node)] = min(at, self.stopped.get((rnd, node), at))

    def take(self, e: dict, at: float) -> None:
        kind, node = e["event"], e.get("node")
        if kind == "round opened":
            self.opened[e["round"]] = at
            self.ended.setdefault(e["round"] - 1, at)
        elif kind == "plan":
            self.closed[e["round"]] = at
            self._takeovers(e["round"], list(e["members"]), at)
            self.members[e["round"]] = list(e["members"])
        elif kind == "job ended":
            self.ended.setdefault(e["round"], at)
        elif kind == "joined round":
            self.joined.setdefault((e["round"], node), at)
        elif kind in ("node finished", "left round"):
            self.stop(e["round"], node, at)
        elif kind == "failure":
            self.stop(e["round"], node, at)
            self.marks.append(Mark(node, FAILURE, at, _short(f"rank {e['rank']} {e['how']}"
                                                             + (f": {e['message']}" if e.get("message") else ""))))
        elif kind == "node lost":
            self.stop(e["round"], node, at)
            self.marks.append(Mark(node, LOST, at, f"lost in round {e['round']}: its lease ended"))
        elif kind == "quarantined":
            self.marks.append(Mark(node, QUARANTINED, at, _short(f"quarantined: {e.get('reason') or ''}")))
        elif kind == "restart counted":
            self.restarts.append(Restart(at, f"restart {e['used']} of {e['max']}"))
        elif kind == "node registered":
            self.alive.setdefault(node, [at, self.end])
        elif kind == "node gone" and node in self.alive:
            self.alive[node][1] = at
        if node is not None and kind != "node gone":
            self.alive.setdefault(node, [at, self.end])

    def _takeovers(self, rnd: int, members: list[str], at: float) -> None:
        """A newcomer to the plan takes the place of a member of the previous plan that is not in this one (a spare
        fills the hole of a lost or quarantined member at its rank)."""
        before = self.members.get(max((r for r in self.members if r < rnd), default=-1))
        if not before:
            return
        left = [n for n in before if n not in members]
        for i, node in enumerate(members):
            if node in before or not left:
                continue
            old = before[i] if i < len(before) and before[i] in left else left[0]
            left.remove(old)
            self.marks.append(Mark(node, TAKEOVER, at, f"takes over from {old}"))

    def bars(self) -> list[Bar]:
        out = []
        for (rnd, node), joined in sorted(self.joined.items(), key=lambda kv: kv[1]):
            round_end = self.ended.get(rnd, self.end)
            closed = self.closed.get(rnd)
            stop = min(self.stopped.get((rnd, node), round_end), round_end)
            if closed is None or node not in self.members.get(rnd, ()):
                out.append(Bar(node, rnd, FORMING, joined, max(joined, min(stop, closed or stop))))
                continue
            out.append(Bar(node, rnd, FORMING, joined, max(joined, closed)))
            out.append(Bar(node, rnd, RUNNING, closed, max(closed, stop)))
            later = [t for (r, n), t in self.joined.items() if n == node and r > rnd]
            until = min(later) if later else self.alive.get(node, [0, self.end])[1]
            if until > stop:
                out.append(Bar(node, rnd, STOPPED, stop, until))
        return out


def layout(entries: list[dict], run_id: str = "", job: int | None = None) -> Timeline:
    """The drawable items of a history (``events.replay``'s entries, in revision order); no I/O."""
    walls = times(entries)
    start = next((t for t in walls if t), None)
    at = [0.0 if t is None or start is None else t - start for t in walls]
    walk = _Walk(max(at, default=0.0))
    for entry, t in zip(entries, at):
        walk.take(entry, t)
    rounds = tuple(Span(f"round {r}", t, walk.ended.get(r, walk.end)) for r, t in sorted(walk.opened.items()))
    rows = tuple(sorted(walk.alive, key=_natural))
    return Timeline(title(entries, run_id, job), start, walk.end, rows, tuple(walk.bars()), tuple(walk.marks),
                    tuple(walk.restarts), rounds, tuple(Span(n, *walk.alive[n]) for n in rows))


def need_matplotlib():
    """matplotlib, set to draw without a display; a ConfigError saying which extra to install when it is missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError(f"--plot needs matplotlib, which is not installed: {EXTRA}") from exc
    matplotlib.use("Agg")
    return matplotlib


def plot(ns, etcd) -> int:
    """``etcd-agent events --plot FILE``: the history replayed (``--follow``: until the job has a result), laid out
    and written to FILE; one line on stdout says where."""
    from ..coord import txns
    from ..schema.keys import RunKeys
    from .events import replay

    if ns.json:
        raise ConfigError("--plot draws the history and --json prints it: give one of them")
    fmt = file_format(ns.plot)
    need_matplotlib()
    from .timeline_draw import draw

    entries: list[dict] = []
    run = RunKeys(ns.root, ns.run_id)
    replay(etcd, run, ns.follow, entries.append)
    keys = txns.current_job(etcd, run)
    picture = layout(entries, ns.run_id, keys.gen if keys is not None else None)
    try:
        draw(picture, ns.plot, fmt)
    except OSError as exc:
        raise ConfigError(f"--plot {ns.plot}: cannot write it: {exc.strerror or exc}") from exc
    print(f"{len(entries)} changes of run {ns.run_id} drawn in {ns.plot}", flush=True)
    return 0
