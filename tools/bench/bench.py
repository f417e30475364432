"""Benchmarks of etcd-agent side by side with torchrun, in the same run, with the same worker script.

    python tools/bench/bench.py [--reps N] [--out DIR] [--only NAME,...] [--kinds etcd-agent,torchrun,...]

Scenarios live in ``scenarios.REGISTRY`` (``--list`` shows them); ``--only`` takes scenario names or groups
(launch, crash, scale, footprint, node-loss, torchrun-backend, warm-restart). Each scenario runs the launcher
kinds of its pair (etcd-agent and torchrun; torchrun-backend: torchrun-etcd-v3 and torchrun, i.e. c10d;
warm-restart: etcd-agent-warm, etcd-agent and torchrun), less those --kinds leaves out. Repetitions of the two
launchers alternate (and alternate which goes first) so that the machine's noise
hits both alike. etcd-agent and torchrun-etcd-v3 use one private etcd per scenario (etcd_agent.etcd.server) and a
fresh run id per repetition; torchrun (c10d) a fresh c10d port and rdzv id per repetition.

Writes into --out: results.json (every raw sample, failures with their reason and the launchers' last log lines),
results.md (median and min-max per metric, ratio torchrun/etcd-agent, for torchrun-backend c10d/etcd-v3),
results.png (if matplotlib is installed), and work/ (per repetition: launcher logs, worker records). A failed
repetition is kept and reported, never dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import traceback
import uuid
from importlib import metadata
from pathlib import Path

import report
from scenarios import ETCD_KINDS, KINDS, REGISTRY, Rep, Scenario

from etcd_agent.etcd.server import EtcdServer
from etcd_agent.proctree import free_port


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="repetitions per scenario and launcher (default 5)")
    p.add_argument("--out", default="bench-out", help="output directory (default bench-out/)")
    p.add_argument("--only", default="", help="comma-separated scenario names or groups (default: all)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="launchers to measure (default: all; each scenario runs those of its pair)")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every per-repetition timeout")
    p.add_argument("--preload", default=None,
                   help="etcd-agent-warm: its --preload (default: etcd-agent's own default, torch)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return p.parse_args(argv)


def select(only: str) -> list[Scenario]:
    if not only:
        return list(REGISTRY.values())
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in REGISTRY and w not in {s.group for s in REGISTRY.values()}]
    if unknown:
        sys.exit(f"unknown scenario or group: {', '.join(unknown)} (see --list)")
    return [s for s in REGISTRY.values() if s.name in wanted or s.group in wanted]


def meta(args) -> dict:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "reps": args.reps, "python": platform.python_version(),
            "torch": version("torch"), "etcd-agent": version("etcd-agent"), "cpus": os.cpu_count(),
            "platform": platform.platform(), "timeout_scale": args.timeout_scale,
            "preload": args.preload}


def log_tails(workdir: Path, lines: int = 12) -> dict[str, list[str]]:
    tails = {}
    for path in sorted((workdir / "logs").glob("*.log")):
        tails[path.name] = path.read_text(errors="replace").splitlines()[-lines:]
    return tails


def run_rep(scenario: Scenario, kind: str, index: int, base: Path, out: Path, etcd: EtcdServer | None,
            scale: float, preload: str | None = None) -> dict:
    workdir = base / kind / f"rep-{index}"
    workdir.mkdir(parents=True, exist_ok=True)
    run_id = f"bench-{scenario.name}-{index}-{uuid.uuid4().hex[:6]}"
    endpoint = etcd.endpoint if kind in ETCD_KINDS and etcd else f"127.0.0.1:{free_port()}"
    rep = Rep(kind, index, workdir, endpoint, run_id, scale, preload)
    sample = {"scenario": scenario.name, "group": scenario.group, "kind": kind, "pair": list(scenario.kinds),
              "rep": index, "run_id": run_id,
              "workdir": str(workdir.relative_to(out)), "ok": False, "metrics": {}, "error": None}
    t0 = time.monotonic()
    try:
        sample["metrics"] = scenario.run(rep)
        sample["ok"] = True
    except Exception as exc:  # any failure of one repetition is recorded with its cause, then the run goes on
        sample["error"] = f"{type(exc).__name__}: {exc}"
        sample["traceback"] = traceback.format_exc(limit=4)
        sample["log_tails"] = log_tails(workdir)
    sample["wall_s"] = time.monotonic() - t0
    return sample


def run_scenario(scenario: Scenario, kinds: list[str], args, out: Path, samples: list[dict], save) -> None:
    base = out / "work" / scenario.name
    base.mkdir(parents=True, exist_ok=True)
    etcd = None
    if set(kinds) & set(ETCD_KINDS) and scenario.needs_etcd:
        etcd = EtcdServer(name=f"bench-{scenario.name}", log_file=str(base / "etcd.log")).start()
    try:
        for index in range(args.reps):
            order = kinds if index % 2 == 0 else kinds[::-1]
            for kind in order:
                sample = run_rep(scenario, kind, index, base, out, etcd, args.timeout_scale, args.preload)
                samples.append(sample)
                save()
                status = "ok" if sample["ok"] else f"FAILED: {sample['error']}"
                shown = ", ".join(f"{k} {v:.3f}" for k, v in sample["metrics"].items())
                print(f"  {scenario.name} {kind} rep {index}: {status} {shown} ({sample['wall_s']:.1f} s)",
                      flush=True)
    finally:
        if etcd:
            etcd.stop()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for s in REGISTRY.values():
            print(f"{s.name:22} {s.group:16} {s.doc}")
        return 0
    kinds = [k for k in args.kinds.split(",") if k]
    if set(kinds) - set(KINDS) or not kinds:
        sys.exit(f"--kinds takes {', '.join(KINDS)}")
    scenarios = select(args.only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "work", ignore_errors=True)
    result = {"meta": meta(args), "samples": []}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(result, indent=1))

    for scenario in scenarios:
        mine = [k for k in scenario.kinds if k in kinds]  # the scenario's pair, in its order, less --kinds' omissions
        if not mine:
            print(f"{scenario.name}: skipped, --kinds leaves out all of {', '.join(scenario.kinds)}", flush=True)
            continue
        print(f"{scenario.name}: {scenario.doc}, {args.reps} repetition(s) per launcher ({', '.join(mine)})",
              flush=True)
        run_scenario(scenario, mine, args, out, result["samples"], save)
    rows = report.summarize(result["samples"])
    result["summary"] = rows
    save()
    table = report.markdown(rows)
    m = result["meta"]
    header = (f"# etcd-agent vs torchrun\n\n{m['started']}; {m['reps']} repetition(s) each; torch {m['torch']}, "
              f"Python {m['python']}, {m['cpus']} CPUs. Times in seconds, memory in MiB.\n\n")
    (out / "results.md").write_text(header + table)
    note = report.plot(rows, out / "results.png")
    failed = sum(not s["ok"] for s in result["samples"])
    print(f"\n{table}\n{failed} failed repetition(s) of {len(result['samples'])}; {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
