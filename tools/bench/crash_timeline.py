"""Where the milliseconds of a worker crash go: a per-step timeline of the crash path, for every node.

    python tools/bench/crash_timeline.py [--reps N] [--nodes 3] [--nproc 2] [--out DIR] [--json FILE]
    python tools/bench/crash_timeline.py --logs DIR      (parse kept logs: bench.py's work/crash-3x2/etcd-agent)

Runs the ``crash-3x2`` scenario of ``bench.py`` (``scenarios.crash``: rank 3 exits 1 in the first round, one
restart) ``--reps`` times against a private etcd, with the agents at ``--log-level debug``
(``$ETCD_AGENT_LOG_LEVEL``), then reads each repetition's agent logs and worker records and prints, per step, every
node's time in ms since the crash (the crashing worker's own ``t_exit``) and the step's delta (its latest node
minus the previous step's latest node). With several repetitions a last table gives each cell's median.

The steps, from the agents' log lines (the text format's wall time, to the millisecond) and the worker records:

  failure seen     the waiter of the crashed worker saw its exit      (debug: "worker rank R ... exited with")
  failure handled  the agent's loop took the group's failure          ("worker rank R (pid P) failed with")
  round bumped     the bump txn is done (the bumping node only)       ("restarting the job")
  new round seen   a node leaves the old round and stops its workers  ("stopping ... round N began")
  workers stopped  every worker and descendant of the old round gone  (debug: "all workers and their ... gone")
  joined           the join txn is done                               ("joined round N")
  round closed     the plan is written (the leader only)              ("closed round N")
  plan read        the node's loop decided to start its workers       (debug: "round N's plan names this node")
  spawned          the last worker's Popen returned                   ("started K workers")
  worker running   the last new worker ran its first line             (its record's ``t_start``)

``--logs DIR`` reads the repetitions under DIR (``rep-*`` directories, or DIR itself) instead of running any;
bench.py's logs are at the default level, so the debug steps are empty there. Imports the benchmark's modules
(``scenarios``, ``procs``) and ``etcd_agent.etcd.server``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

STEPS = (  # (name, pattern of the log line that marks it; None: from the worker records)
    ("failure seen", r"worker rank \d+ \(local rank \d+, pid \d+\) exited with (?!exit code 0)(?!.*while stopping)"),
    ("failure handled", r"worker rank \d+ \(pid \d+\) failed with"),
    ("round bumped", r"restarting the job"),
    ("new round seen", r"stopping .*round {round} began|running -> rendezvous: round {round} began"),
    ("workers stopped", r"all workers and their descendants are gone"),
    ("joined", r"joined round {round} "),
    ("round closed", r"closed round {round} "),
    ("plan read", r"round {round}'s plan names this node"),
    ("spawned", r"rendezvous -> running: started \d+ workers?"),
    ("worker running", None),
)
LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \w \[\S+ (\S+?)(?: r(\d+))?\] (.*)$")
PIDS = re.compile(r"started \d+ workers? \(.*pids ([\d ]+)")


def wall_of(hms: tuple[str, ...], near: float) -> float:
    """The wall time of a log line's ``HH:MM:SS.mmm`` (local time), on the day that puts it nearest ``near``."""
    base = datetime.datetime.fromtimestamp(near)
    t = base.replace(hour=int(hms[0]), minute=int(hms[1]), second=int(hms[2]), microsecond=int(hms[3]) * 1000)
    best = min((t + datetime.timedelta(days=d) for d in (-1, 0, 1)), key=lambda x: abs(x.timestamp() - near))
    return best.timestamp()


def read_lines(logs: Path, near: float) -> list[tuple[float, str, int, str]]:
    """Every agent log line under ``logs``: (wall time, node, round or 0, message), in time order."""
    out = []
    for path in sorted(logs.glob("*.log")):
        for text in path.read_text(errors="replace").splitlines():
            m = LINE.match(text)
            if m:
                out.append((wall_of(m.groups()[:4], near), m.group(5), int(m.group(6) or 0), m.group(7)))
    return sorted(out, key=lambda x: x[0])


def timeline(workdir: Path) -> dict:
    """One repetition's timeline: ``{"nodes": [...], "steps": {step: {node: ms since the crash}}}``."""
    recs = [json.loads(p.read_text()) for p in sorted((workdir / "records").glob("*.json"))]
    crashed = [r for r in recs if r.get("full_gen") == 0 and "t_exit" in r]
    if len(crashed) != 1:
        raise ValueError(f"{workdir}: expected one crash record, found {len(crashed)}")
    t0 = crashed[0]["t_exit"]
    lines = [x for x in read_lines(workdir / "logs", t0) if x[0] >= t0 - 0.002]  # the log's ms are truncated
    nodes = sorted({node for _, node, _, _ in read_lines(workdir / "logs", t0)})
    began = [int(m.group(1)) for _, _, _, msg in lines if (m := re.search(r"round (\d+) began", msg))]
    new_round = min(began, default=2)
    steps: dict[str, dict[str, float]] = {}
    pid_node: dict[int, str] = {}
    for name, pattern in STEPS:
        cells = steps.setdefault(name, {})
        if pattern is None:
            continue
        rx = re.compile(pattern.format(round=new_round))
        for wall, node, _, msg in lines:
            if node not in cells and rx.search(msg):
                cells[node] = (wall - t0) * 1000
                m = PIDS.search(msg) if name == "spawned" else None
                if m:
                    pid_node.update((int(pid), node) for pid in m.group(1).split())
    running = steps["worker running"]
    for r in recs:
        node = pid_node.get(r["pid"])
        if node is not None and r.get("full_gen") == 1:
            running[node] = max(running.get(node, float("-inf")), (r["t_start"] - t0) * 1000)
    return {"workdir": str(workdir), "nodes": nodes, "steps": steps}


def table(nodes: list[str], steps: dict[str, dict[str, float]], title: str) -> str:
    """Markdown: step, each node's ms since the crash, and the delta of the step's latest node."""
    head = f"{title}\n\n| step | " + " | ".join(nodes) + " | latest | delta |\n|---|" + "---|" * (len(nodes) + 2)
    rows, before = [head], 0.0
    for name, _ in STEPS:
        cells = steps.get(name, {})
        shown = [f"{cells[n]:.0f}" if n in cells else "" for n in nodes]
        latest = max(cells.values()) if cells else None
        delta = f"{latest - before:+.0f}" if latest is not None else ""
        if latest is not None:
            before = latest
        rows.append(f"| {name} | " + " | ".join(shown) + f" | {'' if latest is None else f'{latest:.0f}'} | {delta} |")
    return "\n".join(rows)


def median_steps(runs: list[dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, _ in STEPS:
        nodes = sorted({n for r in runs for n in r["steps"].get(name, {})})
        out[name] = {n: statistics.median(r["steps"][name][n] for r in runs if n in r["steps"].get(name, {}))
                     for n in nodes}
    return out


def run(reps: int, nodes: int, nproc: int, out: Path) -> list[Path]:
    """Run the crash scenario ``reps`` times with debug logs; the repetitions' directories."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scenarios import Rep, crash  # noqa: PLC0415  (the benchmark's modules, next to this file)

    from etcd_agent.etcd.server import EtcdServer  # noqa: PLC0415
    os.environ["ETCD_AGENT_LOG_LEVEL"] = "debug"  # the launchers inherit it
    etcd = EtcdServer(name="crash-timeline", log_file=str(out / "etcd.log")).start()
    dirs = []
    try:
        for i in range(reps):
            workdir = out / f"rep-{i}"
            workdir.mkdir(parents=True, exist_ok=True)
            rep = Rep("etcd-agent", i, workdir, etcd.endpoint, f"crash-timeline-{i}-{uuid.uuid4().hex[:6]}")
            metrics = crash(rep, nodes=nodes, nproc=nproc, crash_rank=min(3, nodes * nproc - 1))
            shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            print(f"rep {i}: {shown}", flush=True)
            dirs.append(workdir)
    finally:
        etcd.stop()
    return dirs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="repetitions to run (default 3)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="", help="where the runs' logs and records go (default: a temporary directory)")
    p.add_argument("--logs", default="", help="parse the repetitions under this directory instead of running")
    p.add_argument("--json", default="", help="also write every repetition's timeline as JSON to this file")
    p.add_argument("--title", default="", help="a line above the tables (say which code was measured)")
    args = p.parse_args(argv)
    if args.logs:
        root = Path(args.logs)
        dirs = sorted(d for d in root.glob("rep-*") if d.is_dir()) or [root]
    else:
        out = Path(args.out or tempfile.mkdtemp(prefix="crash-timeline-"))
        out.mkdir(parents=True, exist_ok=True)
        dirs = run(args.reps, args.nodes, args.nproc, out)
    runs = [timeline(d) for d in dirs]
    if args.title:
        print(f"\n{args.title}")
    for r in runs:
        print("\n" + table(r["nodes"], r["steps"], f"{r['workdir']}: ms since the crash"))
    if len(runs) > 1:
        nodes = sorted({n for r in runs for n in r["nodes"]})
        print("\n" + table(nodes, median_steps(runs), f"median of {len(runs)} repetitions: ms since the crash"))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
