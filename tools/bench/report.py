"""Summaries of the raw samples: median and min/max per (scenario, metric, launcher), a markdown table, a PNG chart.

matplotlib is optional: without it ``plot`` returns a note instead of a file. Imports only the standard library.
"""

from __future__ import annotations

import statistics
from pathlib import Path

KINDS = ("etcd-agent", "torchrun")


def summarize(samples: list[dict]) -> list[dict]:
    """One row per (scenario, metric), in first-seen order, with per-kind stats and failure counts."""
    rows: dict[tuple[str, str], dict] = {}
    failed: dict[tuple[str, str], int] = {}
    reps: dict[tuple[str, str], int] = {}
    for s in samples:
        key = (s["scenario"], s["kind"])
        reps[key] = reps.get(key, 0) + 1
        if not s["ok"]:
            failed[key] = failed.get(key, 0) + 1
    for s in samples:
        for metric in s["metrics"]:
            rows.setdefault((s["scenario"], metric), {"scenario": s["scenario"], "metric": metric, "kinds": {}})
    for s in samples:  # scenarios whose every rep failed still get a row
        if not any(k[0] == s["scenario"] for k in rows):
            rows[(s["scenario"], "(no metric: every repetition failed)")] = {
                "scenario": s["scenario"], "metric": "(no metric: every repetition failed)", "kinds": {}}
    for (scenario, metric), row in rows.items():
        for kind in KINDS:
            values = [s["metrics"][metric] for s in samples
                      if s["scenario"] == scenario and s["kind"] == kind and s["ok"] and metric in s["metrics"]]
            row["kinds"][kind] = {
                "n": len(values), "failed": failed.get((scenario, kind), 0), "reps": reps.get((scenario, kind), 0),
                "median": statistics.median(values) if values else None,
                "min": min(values) if values else None, "max": max(values) if values else None,
            }
    return list(rows.values())


def _fmt(v: float) -> str:
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def _cell(st: dict) -> str:
    if st["reps"] == 0:
        return "not run"
    if st["median"] is None:
        return f"failed ({st['failed']}/{st['reps']})"
    text = f"{_fmt(st['median'])} ({_fmt(st['min'])}-{_fmt(st['max'])})"
    return text + (f", {st['failed']}/{st['reps']} failed" if st["failed"] else "")


def markdown(rows: list[dict]) -> str:
    lines = ["| scenario | etcd-agent median (min-max) | torchrun median (min-max) | ratio torchrun/etcd-agent |",
             "|---|---|---|---|"]
    for row in rows:
        a, t = row["kinds"]["etcd-agent"], row["kinds"]["torchrun"]
        ratio = f"{t['median'] / a['median']:.2f}" if a["median"] and t["median"] is not None else "-"
        lines.append(f"| {row['scenario']}: {row['metric']} | {_cell(a)} | {_cell(t)} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> str:
    """Horizontal bars (median, min-max whiskers), one panel per unit; returns what it did."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG (pip install matplotlib to get one)"
    units = sorted({r["metric"].rsplit("[", 1)[-1].rstrip("]") for r in rows if "[" in r["metric"]})
    if not units:
        return "nothing to plot"
    panels = [[r for r in rows if r["metric"].endswith(f"[{u}]")] for u in units]
    fig, axes = plt.subplots(len(units), 1, figsize=(11, 1.2 + 0.75 * sum(len(p) for p in panels)),
                             gridspec_kw={"height_ratios": [len(p) for p in panels]}, squeeze=False)
    for ax, unit, panel in zip(axes[:, 0], units, panels):
        height = 0.38
        for j, kind in enumerate(KINDS):
            ys = [i + (j - 0.5) * height for i in range(len(panel))]
            st = [r["kinds"][kind] for r in panel]
            med = [s["median"] or 0.0 for s in st]
            err = [[(s["median"] - s["min"]) if s["median"] is not None else 0 for s in st],
                   [(s["max"] - s["median"]) if s["median"] is not None else 0 for s in st]]
            ax.barh(ys, med, height=height, xerr=err, capsize=3, label=kind)
            for y, s, m in zip(ys, st, med):  # the label sits past the whisker
                ax.annotate(_fmt(m) if s["median"] is not None else "failed", (s["max"] or m, y), xytext=(4, 0),
                            textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks(range(len(panel)))
        ax.set_yticklabels([f"{r['scenario']}: {r['metric'].rsplit(' [', 1)[0]}" for r in panel], fontsize=8)
        ax.invert_yaxis()
        ax.margins(x=0.12)
        values = [s["median"] for r in panel for s in r["kinds"].values() if s["median"]]
        log_scale = values and max(values) / min(values) > 20
        if log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(unit + (" (log scale)" if log_scale else ""))
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_title("etcd-agent vs torchrun: median, whiskers min-max (failed repetitions excluded)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
