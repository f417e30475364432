"""The scale benchmark's outputs: one line per scenario, a markdown table, a PNG (time, events, writes, CPU vs N).

matplotlib is optional: without it ``plot`` returns a note instead of a file. Imports only the standard library.
"""

from __future__ import annotations

from pathlib import Path

ROUNDS = ("first", "leave", "lost", "exit")  # the scenarios that are one round each; "idle" is a window
LABELS = {"first": "1. first rendezvous (last agent started -> all workers started, round 1)",
          "idle": "idle window (background: keepalives, watch probes)",
          "leave": "2. graceful leave of 1 -> N-1 survivors' workers started",
          "lost": "3. lost lease (SIGKILL + revoke) -> N-2 survivors' workers started",
          "exit": "4. all workers exit 0 -> every agent returned 0"}


def _t(v) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _n(v) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k" if v >= 1e4 else f"{v:.0f}"


def writes(e: dict) -> float:
    """Write requests: Txn + Put + DeleteRange RPCs (LeaseRevoke RPCs are counted apart)."""
    return e["rpc_txn"] + e["rpc_put"] + e["rpc_delete"]


def one_line(out: dict) -> str:
    e = out.get("etcd", {})
    head = (f"{out['time_s']:.3f} s" if out.get("time_s") is not None
            else ("ok" if out["ok"] else f"NOT DONE: {out.get('reached')}"))
    return (f"{head}; {writes(e):.0f} write RPCs, {e.get('watch_events', 0):.0f} watch events, "
            f"{e.get('rpc_range', 0):.0f} range RPCs, {e.get('sent_bytes', 0) / 1e3:.0f} KB sent; "
            f"agent CPU {out.get('agent_cpu_s', 0):.1f} s, etcd CPU "
            f"{out.get('etcd_cpu_s', 0):.1f} s; wall {out.get('wall_s', 0):.1f} s")


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = ["# Simulated scale: N agents against one etcd\n",
             f"{m['started']}; {m['cpus']} CPUs, Python {m['python']}; etcd_agent imported from {m['etcd_agent']} "
             f"(repository HEAD {m['repo_head'][:12] or '?'}); lease TTL {m['args']['lease_ttl']} s; "
             "each scenario capped at "
             f"{m['args']['cap']:g} s. Times in seconds. Counters are etcd's, as differences around each scenario "
             "(see etcd_agent/testing/metrics.py); CPU is user+sys seconds.\n",
             "| N | procs x agents | scenario | time | round | Txn | Put | Delete | LeaseRevoke | key puts | "
             "key deletes | Range (full reads) | watch events | events / N^2 | etcd KB sent | KB sent / N | agent CPU "
             "| etcd CPU | etcd runqueue wait | wall |",
             "|" + "---|" * 20]
    notes = []
    for run in result["runs"]:
        n = run["nodes"]
        shape = f"{run.get('procs', '?')} x <={run.get('agents_per_proc', '?')}"
        for name in ("first", "idle", "leave", "lost", "exit"):
            out = run["scenarios"].get(name)
            if out is None:
                lines.append(f"| {n} | {shape} | {name} | not run |" + " |" * 16)
                continue
            e = out["etcd"]
            if name == "idle":
                time = f"window {out['window_s']:g}"
            elif out["ok"]:
                time = _t(out["time_s"])
            else:
                time = f"**did not finish within {m['args']['cap']:g} s**"
                notes.append(f"- N={n} {name}: {out.get('reached')}; etcd then: {out.get('state')}")
            lines.append(
                f"| {n} | {shape} | {name} | {time} | {out.get('round', '-')} | {_n(e['rpc_txn'])} | "
                f"{_n(e['rpc_put'])} | {_n(e['rpc_delete'])} | {_n(e['rpc_lease_revoke'])} | {_n(e['key_puts'])} | "
                f"{_n(e['key_deletes'])} | {_n(e['rpc_range'])} | {_n(e['watch_events'])} | "
                f"{e['watch_events'] / n ** 2:.2f} | {e['sent_bytes'] / 1e3:.0f} | {e['sent_bytes'] / 1e3 / n:.1f} | "
                f"{out['agent_cpu_s']:.1f} | "
                f"{out['etcd_cpu_s']:.1f} | {out.get('etcd_runqueue_wait_s', 0):.1f} | {out['wall_s']:.1f} |")
        if run.get("error"):
            notes.append(f"- N={n}: error: {run['error']}")
        notes += [f"- N={n}: {note}" for note in run.get("notes", [])]
        if "wall_s" in run:
            notes.append(f"- N={n}: {run.get('procs')} processes; setup {run.get('setup_s', 0):.1f} s, whole run "
                         f"{run['wall_s']:.1f} s; {run.get('session_losses', 0)} session loss(es) (agents that "
                         "fenced themselves)")
    legend = ["", "Scenarios: " + "; ".join(f"{k}: {v}" for k, v in LABELS.items()) + ".", "",
              "Columns: Txn/Put/Delete/LeaseRevoke/Range are RPCs etcd served; key puts and key deletes are what "
              "its MVCC store applied (a lease revoke deletes each attached key); watch events are summed over "
              "all watchers; etcd KB sent is everything etcd sent to clients in the scenario (each is one round, "
              "but idle), in KB of 1000 bytes, and KB sent / N the same per node (constant in N where a round costs "
              "O(N) bytes); etcd runqueue wait is the time etcd's threads were "
              "runnable but not running (CPU-starved by the agents). A scenario that did not finish shows what "
              "happened within the cap."]
    return "\n".join(lines + legend + ([""] + notes if notes else [])) + "\n"


def plot(result: dict, path: Path) -> str:
    """Four panels against N (log-log): time, watch events, write RPCs, agent CPU per round."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG (pip install -e '.[bench]' to get one)"
    runs = [r for r in result["runs"] if r.get("scenarios")]
    if not runs:
        return "nothing to plot"
    cap = result["meta"]["args"]["cap"]
    panels = [("time [s] (x: did not finish, drawn at the cap)", lambda o: o["time_s"] if o["ok"] else None),
              ("watch events per round", lambda o: o["etcd"]["watch_events"]),
              ("write RPCs per round (Txn + Put + DeleteRange)", lambda o: writes(o["etcd"])),
              ("agent CPU per round [s] (sum over processes)", lambda o: o["agent_cpu_s"])]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, (title, value) in zip(axes.flat, panels):
        for name in ROUNDS:
            pts = [(r["nodes"], r["scenarios"][name]) for r in runs if name in r["scenarios"]]
            good = [(n, value(o)) for n, o in pts if o["ok"] and value(o)]
            line, = ax.plot([n for n, _ in good], [v for _, v in good], "o-", label=name)
            dnf = [(n, value(o)) for n, o in pts if not o["ok"]]
            if title.startswith("time"):
                ax.plot([n for n, _ in dnf], [cap] * len(dnf), "x", color=line.get_color(), markersize=10, mew=2)
            else:  # what a round that did not finish cost within the cap: hollow, not joined to the line
                ax.plot([n for n, v in dnf if v], [v for _, v in dnf if v], "o", mfc="none", color=line.get_color())
        ns = sorted({r["nodes"] for r in runs})
        if title.startswith("watch"):
            ax.plot(ns, [2 * n * n for n in ns], "k--", lw=0.8, label="2 N^2")
            ax.plot(ns, [4 * n for n in ns], "k-.", lw=0.8, label="4 N")
            ax.plot(ns, [n for n in ns], "k:", lw=0.8, label="N")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (agents)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("etcd-agent simulated scale: N production agents, one etcd, stand-in workers "
                 "(hollow: a round that did not finish, counted within the cap)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
