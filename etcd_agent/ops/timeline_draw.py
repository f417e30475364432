"""The picture of a ``timeline.Timeline``: matplotlib's Figure on the Agg canvas (no display, no pyplot, no global
state), written as PNG or SVG (SVG with its text as text, so a reader or a test finds the node names in it).

Rows top to bottom in the timeline's order; on each the node's registration as a thin line and its rounds as bars;
the rounds as alternating shaded spans named along the top; restarts as dashed vertical lines; markers with their
text next to them (to the left in the right half, so that none runs off the picture). Imports matplotlib (the
``plot`` extra) and ``ops.events`` for the wall-clock text; only ``timeline.plot`` imports this module.
"""

from __future__ import annotations

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .events import when
from .timeline import FAILURE, FORMING, LOST, QUARANTINED, RUNNING, STOPPED, TAKEOVER, Timeline

COLORS = {FORMING: "#9ecae1", RUNNING: "#41ab5d", STOPPED: "#d9d9d9"}
STATE_NAMES = {FORMING: "joined, round forming", RUNNING: "running", STOPPED: "stopped (done, failed or restarting)"}
MARKERS = {  # kind -> (marker, color)
    FAILURE: ("X", "#d62728"), LOST: ("D", "#252525"), QUARANTINED: ("s", "#ff7f0e"), TAKEOVER: ("^", "#7b3294"),
}
RESTART_COLOR = "#d62728"
BAR_HEIGHT = 0.44
DPI = 110


def _row_y(picture: Timeline) -> dict[str, float]:
    n = len(picture.rows)
    return {node: float(n - 1 - i) for i, node in enumerate(picture.rows)}


def _rounds(ax, picture: Timeline, top: float) -> None:
    for i, span in enumerate(picture.rounds):
        if i % 2 == 0:
            ax.axvspan(span.start, max(span.end, span.start), color="#f2f2f2", zorder=0, lw=0)
        ax.text(span.start, top, f" {span.label}", fontsize=8, color="#555555", va="bottom", ha="left",
                clip_on=False)


def _nodes(ax, picture: Timeline, y: dict[str, float]) -> None:
    for span in picture.registered:
        ax.hlines(y[span.label], span.start, span.end, color="#737373", lw=1, zorder=1)
    for bar in picture.bars:
        ax.barh(y[bar.node], bar.end - bar.start, left=bar.start, height=BAR_HEIGHT, color=COLORS[bar.state],
                edgecolor="white", lw=0.5, zorder=2)


def _marks(ax, picture: Timeline, y: dict[str, float], width: float) -> None:
    placed: dict[str, int] = {}
    for mark in picture.marks:
        symbol, color = MARKERS[mark.kind]
        row = y[mark.node]
        ax.plot([mark.at], [row], marker=symbol, color=color, markersize=10, markeredgecolor="white", ls="none",
                zorder=4)
        k = placed[mark.node] = placed.get(mark.node, -1) + 1  # a row's later marks alternate above and below
        dy = BAR_HEIGHT / 2 + 0.08 if k % 2 == 0 else -(BAR_HEIGHT / 2 + 0.08)
        right_half = mark.at > width / 2
        ax.annotate(mark.text, (mark.at, row + dy), xytext=(-4 if right_half else 4, 0), textcoords="offset points",
                    fontsize=8, color=color, zorder=5, annotation_clip=False, ha="right" if right_half else "left",
                    va="bottom" if dy > 0 else "top")


def _restarts(ax, picture: Timeline, bottom: float) -> None:
    for restart in picture.restarts:
        ax.axvline(restart.at, color=RESTART_COLOR, ls="--", lw=1.1, zorder=3)
        ax.annotate(restart.text, (restart.at, bottom), xytext=(-3, 2), textcoords="offset points", fontsize=8,
                    color=RESTART_COLOR, rotation=90, ha="right", va="bottom", zorder=5)


def _legend(ax, picture: Timeline) -> None:
    handles = [Patch(color=COLORS[s], label=STATE_NAMES[s]) for s in (FORMING, RUNNING, STOPPED)]
    handles.append(Line2D([], [], color="#737373", lw=1, label="registered (lease held)"))
    for kind in dict.fromkeys(m.kind for m in picture.marks):
        symbol, color = MARKERS[kind]
        handles.append(Line2D([], [], marker=symbol, color=color, ls="none", markersize=8, label=kind))
    if picture.restarts:
        handles.append(Line2D([], [], color=RESTART_COLOR, ls="--", label="restart"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(len(handles), 4),
              fontsize=8, frameon=False)


def draw(picture: Timeline, path: str, fmt: str) -> None:
    """Write ``picture`` to ``path`` as ``fmt`` (``png`` or ``svg``)."""
    n = max(len(picture.rows), 1)
    width = max(picture.end, 1e-3) * 1.03
    fig = Figure(figsize=(13, 2.6 + 0.75 * n), dpi=DPI)
    ax = fig.subplots()
    y = _row_y(picture)
    top, bottom = n - 0.5 + 0.1, -0.75
    _rounds(ax, picture, top)
    _nodes(ax, picture, y)
    _restarts(ax, picture, bottom + 0.05)
    _marks(ax, picture, y, width)
    ax.set_xlim(-width * 0.01, width)
    ax.set_ylim(bottom, top)
    ax.set_yticks([y[node] for node in picture.rows], list(picture.rows), fontsize=9)
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    start = when(picture.start_wall) if picture.start_wall else "no time recorded"
    ax.set_xlabel(f"seconds since the job started ({start}, local time)", fontsize=9)
    ax.set_title(picture.title, loc="left", fontsize=11, pad=18)
    _legend(ax, picture)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "etcd-agent"}):
        fig.savefig(path, format=fmt, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None)
