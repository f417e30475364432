"""Summaries of the raw samples: median and min/max per (scenario, metric, launcher), markdown tables, a PNG chart.

Each scenario compares the kinds of its ``pair`` (a sample's ``pair``: base first, then the others); there is one
table per pair, with the ratio of each other kind to the base: torchrun/etcd-agent; for the torchrun-backend group
c10d/etcd-v3; for the warm-restart group cold/warm and torchrun/warm.
matplotlib is optional: without it ``plot`` returns a note instead of a file. Imports only the standard library.
"""

from __future__ import annotations

import statistics
from pathlib import Path

KINDS = ("etcd-agent", "torchrun", "torchrun-etcd-v3", "etcd-agent-warm")  # as scenarios.KINDS; fixes the colours
DEFAULT_PAIR = ("etcd-agent", "torchrun")  # samples written before pairs existed
# kinds of a scenario (base first) -> (the column names, the line above its table or "")
PAIRS = {
    ("etcd-agent", "torchrun"): (("etcd-agent", "torchrun"), ""),
    ("torchrun-etcd-v3", "torchrun"): (("etcd-v3", "c10d"), "torchrun --rdzv-backend c10d vs --rdzv-backend etcd-v3 "
                                       "(the same torchrun and worker, both backends' defaults):"),
    ("etcd-agent-warm", "etcd-agent", "torchrun"): (("etcd-agent --warm-restart", "etcd-agent cold", "torchrun"),
                                                    "Warm restarts (a real torch DDP job, gloo): etcd-agent "
                                                    "--warm-restart vs etcd-agent without it (cold) vs torchrun:"),
}


def pair_of(sample: dict) -> tuple[str, ...]:
    return tuple(sample.get("pair") or DEFAULT_PAIR)


def names_of(pair: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    return PAIRS.get(pair, (pair, ""))


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
            rows.setdefault((s["scenario"], metric), {"scenario": s["scenario"], "metric": metric,
                                                      "pair": pair_of(s), "kinds": {}})
    for s in samples:  # scenarios whose every rep failed still get a row
        if not any(k[0] == s["scenario"] for k in rows):
            rows[(s["scenario"], "(no metric: every repetition failed)")] = {
                "scenario": s["scenario"], "metric": "(no metric: every repetition failed)", "pair": pair_of(s),
                "kinds": {}}
    for (scenario, metric), row in rows.items():
        for kind in row["pair"]:
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
    """One table per kinds tuple, in first-seen order; each ratio is other/base (torchrun/etcd-agent, c10d/etcd-v3,
    cold/warm and torchrun/warm)."""
    pairs = list(dict.fromkeys(tuple(r["pair"]) for r in rows))
    tables = []
    for pair in pairs:
        names, title = names_of(pair)
        base = names[0]
        lines = [title, ""] if title else []
        lines += ["| scenario | " + " | ".join(f"{n} median (min-max)" for n in names) + " | "
                  + " | ".join(f"ratio {n}/{base}" for n in names[1:]) + " |",
                  "|---|" + "---|" * (2 * len(names) - 1)]
        for row in rows:
            if tuple(row["pair"]) != pair:
                continue
            stats = [row["kinds"][k] for k in pair]
            a = stats[0]
            ratios = [f"{t['median'] / a['median']:.2f}" if a["median"] and t["median"] is not None else "-"
                      for t in stats[1:]]
            lines.append(f"| {row['scenario']}: {row['metric']} | " + " | ".join(_cell(st) for st in stats) + " | "
                         + " | ".join(ratios) + " |")
        tables.append("\n".join(lines) + "\n")
    return "\n".join(tables)


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
        bars = max(len(r["pair"]) for r in panel)
        height = 0.76 / bars  # one bar per kind of the row: its base first
        for kind in dict.fromkeys(k for r in panel for k in r["pair"]):  # the pairs' order; colours from KINDS
            at = [(i, r["pair"].index(kind)) for i, r in enumerate(panel) if kind in r["kinds"]]
            ys = [i + (j - (len(panel[i]["pair"]) - 1) / 2) * height for i, j in at]
            st = [panel[i]["kinds"][kind] for i, _ in at]
            med = [s["median"] or 0.0 for s in st]
            err = [[(s["median"] - s["min"]) if s["median"] is not None else 0 for s in st],
                   [(s["max"] - s["median"]) if s["median"] is not None else 0 for s in st]]
            ax.barh(ys, med, height=height, xerr=err, capsize=3, label=kind, color=f"C{KINDS.index(kind)}")
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
    names = " / ".join(" vs ".join(names_of(p)[0]) for p in dict.fromkeys(tuple(r["pair"]) for r in rows))
    axes[0, 0].set_title(f"{names}: median, whiskers min-max (failed repetitions excluded)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
