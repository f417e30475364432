"""Steady load: what N idle simulated agents cost etcd and their own processes once the job runs.

    flock /tmp/bench.lock .venv/bin/python tools/bench/steady.py --nodes 30 --idle 60 --out DIR
        [--endpoints 1,2] [--lease-ttl 5] [--agents-per-proc 25] [--settle 5] [--label TEXT]

What runs. A fresh etcd (``etcd_agent.etcd.server.EtcdServer``, data on tmpfs) and N production agents
(``etcd_agent.agent.Agent`` through ``etcd_agent/testing/sim.py``, K per process, the processes of scale.py:
``sim_proc.py``, ``scale_procs.Fleet``) at the agent's DEFAULT lease TTL (5 s unless ``--lease-ttl`` says
otherwise), all in one job of exactly N nodes. Once every agent's stand-in workers run in round 1, ``--settle``
seconds pass (the round's backlog), then the idle window of ``--idle`` seconds is measured:

- etcd's requests, from its ``/metrics``: ``grpc_server_msg_received_total`` per gRPC method (one per unary call:
  Range, Txn, ...; one per stream message: each keepalive on a LeaseKeepAlive stream, each create, cancel and
  progress request on a Watch stream), per agent per second; and the watch responses etcd sent
  (``grpc_server_msg_sent_total{grpc_method="Watch"}``: events, progress answers).
- the agent processes, from /proc: threads per agent (tasks of the processes / agents, gRPC's own included; the
  Python threads by name from the processes themselves, gRPC core's native ones by their kernel name), context
  switches per agent per second (every time one of their threads woke up, summed over the tasks: the wake-ups of
  threads that wake for nothing show here), and CPU (user+sys) milliseconds per agent per idle second.
- session losses (lines "session lost" in the process logs over the whole run: there should be none).

``--endpoints 2`` gives the agents the one etcd under two names (``127.0.0.1:PORT,localhost:PORT``): the session
then follows its several-members keepalive rule (``Timings.keepalive``), as it would with a 3-member etcd, while
etcd's counters still see every request. ``--endpoints 1,2`` runs both, each with a fresh etcd.

Writes results.json, results.md and threads.md (threads per agent by kind, with their wake-ups) into --out and
prints them; runs append their rows, named by ``--label``, so a before and an after run land in one table.
Every process is SIGKILLed in a ``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from scale_procs import Board, Fleet, count_lines, cpu_of

from etcd_agent.etcd.server import EtcdServer
from etcd_agent.testing import metrics as etcd_metrics

HERE = Path(__file__).resolve().parent
METHODS = ("LeaseKeepAlive", "Watch", "Range", "Txn")  # the columns; every other method adds to "other"


def requests_by_method(client_url: str) -> dict[str, float]:
    """``grpc_server_msg_received_total`` per method now (unary calls and stream messages alike), and etcd's watch
    responses sent (``watch_sent``)."""
    out: dict[str, float] = {}
    for name, labels, value in etcd_metrics.read(client_url):
        if name == "grpc_server_msg_received_total":
            out[labels.get("grpc_method", "?")] = out.get(labels.get("grpc_method", "?"), 0.0) + value
        elif name == "grpc_server_msg_sent_total" and labels.get("grpc_method") == "Watch":
            out["watch_sent"] = out.get("watch_sent", 0.0) + value
    return out


def _per_task(pids: list[int], name: str, parse) -> dict:
    """``parse(text)`` of /proc/<pid>/task/<tid>/<name> for every thread of the processes, by thread id; threads that
    ended meanwhile are left out."""
    out: dict = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/{name}") as f:
                    out[int(tid)] = parse(f.read())
            except (OSError, ValueError, IndexError):
                continue
    return out


def task_switches(pids: list[int]) -> dict[int, int]:
    """Context switches so far (voluntary and not) of every thread of the processes, by thread id."""
    return _per_task(pids, "status", lambda text: sum(int(line.split()[1]) for line in text.splitlines() if
                                                      line.startswith(("voluntary_ctxt_switches",
                                                                       "nonvoluntary_ctxt_switches"))))


def task_names(pids: list[int]) -> dict[int, str]:
    """The kernel's name of every thread of the processes (``comm``: gRPC core names its own, e.g. event_engine)."""
    return _per_task(pids, "comm", str.strip)


def by_kind(kinds: dict[str, list[int]], before: dict[int, int], after: dict[int, int], n: int,
            window: float, names: dict[int, str] | None = None) -> dict[str, dict[str, float]]:
    """For each kind of thread: threads per agent and their wake-ups per agent per second; the tasks that are no
    Python thread (gRPC's core, the interpreter's own) under "(native) NAME", by their kernel name."""
    owner = {tid: kind for kind, tids in kinds.items() for tid in tids}
    names = names or {}
    out: dict[str, dict[str, float]] = {}
    for tid, count in after.items():
        row = out.setdefault(owner.get(tid, f"(native) {names.get(tid, '?')}"), {"threads": 0.0, "wakeups": 0.0})
        row["threads"] += 1 / n
        row["wakeups"] += (count - before.get(tid, count)) / (n * window)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["wakeups"]))


def run_one(n: int, endpoints: int, args, workdir: Path) -> dict:
    """One fresh etcd, N agents with ``endpoints`` names for it, the idle window measured."""
    data_dir = tempfile.mkdtemp(prefix=f"etcd-steady-{n}-", dir=args.etcd_dir)
    etcd = EtcdServer(name=f"steady-{n}", data_dir=data_dir, log_file=str(workdir / "etcd.log"))
    fleet, board = None, Board()
    result: dict = {"nodes": n, "endpoints": endpoints, "lease_ttl": args.lease_ttl, "label": args.label}
    try:
        etcd.start()
        names = ["127.0.0.1", "localhost"][:endpoints]
        endpoint = ",".join(f"{h}:{etcd.client_port}" for h in names)
        params = {"endpoint": endpoint, "run_id": f"steady-{n}-{os.getpid()}", "min_nodes": n, "max_nodes": n,
                  "lease_ttl": args.lease_ttl, "last_call": 1.0, "join_timeout": 600.0, "max_restarts": 10,
                  "etcd_timeout": 60.0}
        k = args.agents_per_proc
        fleet = Fleet(n, k)
        fleet.spawn({"params": params, "log_level": "WARNING", "nice": 0}, workdir, board)
        count = len(fleet.children)
        if not board.wait(lambda: len(board.replies["ready"]) == count, time.monotonic() + 120):
            raise RuntimeError("not every process became ready")
        for c in fleet.children:
            c.send(cmd="start")
        if not board.wait(lambda: len(board.starts.get(1, {})) == n, time.monotonic() + args.cap):
            raise RuntimeError(f"round 1 did not start everywhere within {args.cap:g} s "
                               f"({len(board.starts.get(1, {}))} of {n})")
        threading.Event().wait(args.settle)  # a pause, not a synchronization: round 1's backlog drains
        pids = [c.proc.pid for c in fleet.children]
        for c in fleet.children:
            c.send(cmd="threads")
        board.wait(lambda: len(board.replies["threads"]) == count, time.monotonic() + 30)
        kinds: dict[str, list[int]] = {}
        for msg in board.replies["threads"]:
            for kind, tids in msg["kinds"].items():
                kinds.setdefault(kind, []).extend(tids)
        etcd_ps = psutil.Process(etcd.pid)
        r0, sw0, cpu0, ecpu0, t0 = requests_by_method(etcd.client_url), task_switches(pids), fleet.cpu(), \
            cpu_of(etcd_ps), time.monotonic()
        threading.Event().wait(args.idle)  # the measurement window
        r1, sw1, cpu1, ecpu1 = requests_by_method(etcd.client_url), task_switches(pids), fleet.cpu(), cpu_of(etcd_ps)
        window = time.monotonic() - t0
        per = n * window
        delta = {m: r1.get(m, 0.0) - r0.get(m, 0.0) for m in set(r0) | set(r1)}
        threads = by_kind(kinds, sw0, sw1, n, window, task_names(pids))
        result.update(
            window_s=window, procs=count, agents_per_proc=k,
            requests={m: delta.get(m, 0.0) for m in METHODS},
            other=sum(v for m, v in delta.items() if m not in METHODS and m != "watch_sent"),
            watch_sent=delta.get("watch_sent", 0.0),
            per_agent_s=sum(v for m, v in delta.items() if m != "watch_sent") / per,
            threads_per_agent=sum(t["threads"] for t in threads.values()),
            switches_per_agent_s=sum(t["wakeups"] for t in threads.values()),
            cpu_ms_per_agent_s=1000 * (cpu1 - cpu0) / per, etcd_cpu_ms_s=1000 * (ecpu1 - ecpu0) / window,
            threads=threads)
    except Exception as exc:  # noqa: BLE001 - recorded; the next run still goes
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if fleet is not None:
            fleet.close()
        etcd.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        result["session_losses"] = count_lines(workdir.glob("proc-*.log"), "session lost")
    return result


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r.get('label') or '-'} | {r['nodes']} | {r['endpoints']} | {r['lease_ttl']} | error: " \
               f"{r['error']} |" + " |" * 11
    per = r["nodes"] * r["window_s"]
    cols = [f"{r['requests'][m] / per:.2f}" for m in METHODS] + [f"{r['other'] / per:.2f}"]
    return (f"| {r.get('label') or '-'} | {r['nodes']} | {r['endpoints']} | {r['lease_ttl']} | {r['window_s']:.0f} | "
            + " | ".join(cols) + f" | **{r['per_agent_s']:.2f}** | {r['watch_sent'] / per:.2f} | "
            f"{r['threads_per_agent']:.1f} | {r['switches_per_agent_s']:.1f} | {r['cpu_ms_per_agent_s']:.2f} | "
            f"{r['etcd_cpu_ms_s']:.0f} | {r['session_losses']} |")


HEADER = ("| run | N | endpoints | TTL s | idle s | keepalives | watch msgs | Range | Txn | other | **requests** | "
          "watch responses | threads | wake-ups | agent CPU ms | etcd CPU ms/s | sessions lost |\n"
          "|" + "---|" * 17 + "\n")
LEGEND = ("Per idle agent per second unless said otherwise: requests etcd received (grpc_server_msg_received_total: "
          "unary calls plus stream messages), watch responses etcd sent, threads per agent (tasks of the agent "
          "processes / N), wake-ups (context switches of their threads), agent CPU (user+sys); etcd CPU per "
          "second of the window for all N.\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=30, help="simulated agents, N (default 30)")
    p.add_argument("--endpoints", default="1", help="names the agents get for the one etcd: 1, 2 or 1,2")
    p.add_argument("--lease-ttl", type=int, default=5, help="the agents' --lease-ttl (default 5: the agent's)")
    p.add_argument("--agents-per-proc", type=int, default=25, help="agents per process (default 25)")
    p.add_argument("--idle", type=float, default=60.0, help="seconds of the measured idle window (default 60)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds between round 1 and the window (default 5)")
    p.add_argument("--cap", type=float, default=120.0, help="seconds round 1 may take to start (default 120)")
    p.add_argument("--label", default="", help="names this run's rows in results.md (e.g. before, after)")
    p.add_argument("--out", default="steady-out", help="output directory (default steady-out/)")
    p.add_argument("--etcd-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where etcd's data directory goes (default /dev/shm: tmpfs)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    args.label = args.label or commit
    runs = []
    for e in (int(x) for x in args.endpoints.split(",") if x.strip()):
        workdir = out / "work" / f"N{args.nodes}-e{e}"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        print(f"N={args.nodes}, {e} endpoint name(s): running", flush=True)
        r = run_one(args.nodes, e, args, workdir)
        r.update(commit=commit, cpus=os.cpu_count(), started=time.strftime("%Y-%m-%d %H:%M:%S %z"))
        runs.append(r)
        print(json.dumps(r), flush=True)
    with open(out / "results.json", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in runs)
    md = out / "results.md"
    if not md.exists():
        md.write_text(f"# Steady load of idle agents\n\n{LEGEND}\n{HEADER}")
    with open(md, "a") as f:
        f.writelines(row(r) + "\n" for r in runs)
    for r in runs:
        if "threads" in r:
            kinds = ", ".join(f"{k} {t['threads']:.2g} ({t['wakeups']:.2g}/s)" for k, t in r["threads"].items())
            line = f"- {r['label']}, {r['endpoints']} endpoint name(s): {kinds}\n"
            with open(out / "threads.md", "a") as f:
                f.write(line)
            print("threads per agent (their wake-ups per agent per second): " + line, end="")
    print("\n" + md.read_text())
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
