"""Simulated scale: N production agents against ONE real etcd on this machine, several agents per process.

    .venv/bin/python tools/bench/scale.py --nodes 10,100,300,1000 --out DIR
        [--agents-per-proc K | --procs P] [--cap 240] [--lease-ttl 60] [--idle 5] [--etcd-dir DIR]

What runs. Every simulated node is the production ``etcd_agent.agent.Agent`` in a thread of its own calling
``run()``: a real etcd client, session lease and keepalive thread, watch, mirror, ``decide`` and guarded txns
(``etcd_agent/testing/sim.py``). Only the workers are stand-ins that run until stopped or until the scenario ends
them. For each N the
benchmark starts a fresh etcd (``etcd_agent.etcd.server.EtcdServer``, etcd's defaults plus a 4 GiB backend quota;
data on tmpfs unless ``--etcd-dir`` says otherwise, so that this VM's disk does not set the pace), ceil((N-1)/K)
processes (``sim_proc.py``) of at most K agents, and one more process holding only the victim of scenario 3. All N
form one job: ``--nnodes (N-2):N --max-restarts 10 --lease-ttl 60 --nproc-per-node 1``.

Scenarios, in order; each is capped at ``--cap`` seconds, and one that does not finish is reported as "did not
finish within X s" with what it reached (then the later scenarios of that N are skipped):

1. first: every process starts its agent threads at once; from the moment the last agent was started (and, as
   ``from_first_s``, the first) until every agent's stand-in workers started in round 1.
   idle: ``--idle`` seconds with nothing happening: the background cost (keepalives every TTL/3, watch progress
   probes every max(0.5, TTL/5) s per agent, and whatever backlog round 1 left).
2. leave: one agent (group rank N/2) leaves gracefully, exactly as agent.py's SIGTERM handler makes it
   (``Agent.leave``: the signal, a ``Signalled`` event, the shutdown event): it stops its workers and revokes its
   lease. From the leave until all N-1 survivors' workers started in the next round.
3. lost: the victim's process is SIGKILLed and reaped, so nothing of that agent can touch etcd again (a dead
   node: no keepalive, no revoke, no rejoin), then its lease is revoked from outside with an etcd client. A revoke
   does what the expiry of a dead node's lease does (etcd's lessor revokes an expired lease the same way: every
   attached key deleted in one txn), without waiting out the TTL. From the revoke until all N-2 survivors' workers
   started in the next round.
4. exit: every stand-in worker exits 0; until every agent's ``run()`` returned 0 (exit barrier, job result).

Timings: ``--lease-ttl`` defaults to 60 s, not the agent's 5 s. Here N agents share this machine's cores (on 2
cores, 1000 agents get 0.2% of a core each) and a keepalive attempt may take only TTL/9 before it is retried, the
session being declared lost after TTL - max(1, TTL/4) s without a success. CPU-starved agents then fence themselves
and the job churns, which measures the oversubscription of the simulation, not the protocol. Measured here: TTL 5
at N=100, 746 session losses in 120 s and round 1 never formed; TTL 30 at N=300, 239-263 losses within 25 s;
TTL 60 at N=300, 7 within 150 s. No measured time depends on the TTL (the leave revokes its lease, the lost lease
is revoked from outside); a longer TTL only thins out the background keepalives (every TTL/3) and watch probes
(every max(0.5, TTL/5) s). Session losses are counted (``session_losses``, from the process logs).
``--last-call`` defaults to cap + 60 s, so round 1 closes only when all N joined (the MAX rule) and never early
with N-2; rounds 2 and 3 close on the fast path (every registered node joined), so the last call never runs out
in a run that finishes and is part of no measured time. ``--join-timeout`` is max(600, 4 x cap).
``--etcd-timeout`` (how long one etcd call keeps retrying, the first contact included; the agent's default is
10 s) defaults to the cap: with 10 s, at N=300 agents whose process was too busy to take etcd's answer within the
3 s attempt timeout gave up at start with a ConfigError ("cannot reach etcd").

CPU: the agent processes run at ``--agent-nice`` 19 in this process's session; etcd runs in a session of its own
whose autogroup is set to nice -20 and its threads to nice -10 (root only; ``etcd_priority`` in the results says
what was done). Even so, once the agents saturate the cores etcd is scheduled late: ``etcd_runqueue_wait_s`` (from
/proc/<pid>/task/*/schedstat: time etcd's threads were runnable but not running) shows it; at N=300 they waited
about 3.5 s per 2 s while running 0.1-0.2 s, and small reads took seconds. So numbers at N where the agents
saturate the machine include etcd latency that this machine, not etcd, causes.

Reading the times: all N agents share this machine, so once the agents' total CPU per round exceeds what the cores
give, a round takes about (agent CPU of the round) / (cores); on real nodes every agent has its own CPU. Read each
time together with the CPU columns: agent CPU per round / N is what one node would spend. A scenario that did not
finish reports the counters of what happened within the cap.

Measured per scenario (each scenario is one round): its time; etcd's work from ``/metrics`` as differences around
the scenario (``etcd_agent/testing/metrics.py`` says what each counter counts on etcd 3.4: key puts, delete operations,
Txn/Put/DeleteRange/Range RPCs, watch events sent summed over watchers, bytes sent); agent CPU seconds (user+sys
summed over the agent processes, psutil) and etcd's CPU seconds. Times are ``time.monotonic()``, system-wide.

Writes into --out: results.json (after every scenario), results.md, results.png (needs matplotlib:
``pip install -e '.[bench]'``; skipped with a note otherwise) and work/N<n>/ (etcd.log, one log per process).
The processes and their reports: ``scale_procs.py``; the outputs: ``scale_report.py``.
Cleanup: every process is SIGKILLed in a ``finally`` (also on errors and Ctrl-C/SIGTERM) and etcd is stopped; the
processes also get SIGKILL from the kernel if this one dies (parent-death signal) and exit when their stdin closes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import psutil

from etcd_agent.testing import metrics as etcd_metrics
import scale_report
from scale_procs import Board, Fleet, count_lines, cpu_of, prioritize, schedstat

import etcd_agent
from etcd_agent.config import EtcdConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.etcd.client import Etcd
from etcd_agent.schema.keys import Keys
from etcd_agent.etcd.server import EtcdServer

HERE = Path(__file__).resolve().parent
ETCD_ARGS = ("--quota-backend-bytes=4294967296",)
ROOT = "/etcd-agent"
SCENARIOS = ("first", "idle", "leave", "lost", "exit")


class Run:
    """One N: etcd, the fleet, the scenarios in order."""

    def __init__(self, n: int, args, workdir: Path, save):
        self.n, self.args, self.workdir, self.save = n, args, workdir, save
        self.board = Board()
        self.run_id = f"scale-{n}-{os.getpid()}"
        self.result = {"nodes": n, "scenarios": {}, "notes": []}

    def _cap(self) -> float:
        return time.monotonic() + self.args.cap

    def _broken(self, nodes) -> str:
        """Why waiting on ``nodes`` is pointless now (an agent returned, a process ended), or ''."""
        gone = [n for n in nodes if n in self.board.done]
        if gone:
            d = self.board.done[gone[0]]
            return f"agent {gone[0]} returned early ({d.get('error') or d.get('code')})"
        wanted = set(nodes)
        dead = [c.index for c in self.fleet.children if c.index in self.board.closed and wanted & set(c.nodes)]
        return f"process {dead[0]} ended" if dead else ""

    def _wait_next_round(self, prev: int, nodes: list[str], deadline: float) -> tuple[int | None, str]:
        """The first round after ``prev`` in which every node of ``nodes`` started workers."""
        found: list[int] = []

        def ready() -> bool:
            for rnd in sorted(r for r in self.board.starts if r > prev):
                if len(self.board.starts[rnd]) >= len(nodes) and all(n in self.board.starts[rnd] for n in nodes):
                    found.append(rnd)
                    return True
            return bool(self._broken(nodes))

        self.board.wait(ready, deadline)
        with self.board.cond:
            if found:
                return found[0], ""
            why = self._broken(nodes)
            got = {r: sum(n in s for n in nodes) for r, s in self.board.starts.items() if r > prev}
            reached = ", ".join(f"round {r}: {c} of {len(nodes)}" for r, c in sorted(got.items())) or "no new round"
            return None, (why + "; " if why else f"did not finish within {self.args.cap:g} s; ") + \
                f"workers started: {reached}"

    def _finish(self, rnd, why, nodes, t_ref) -> dict:
        if rnd is None:
            return {"ok": False, "time_s": None, "reached": why}
        starts = [self.board.starts[rnd][n] for n in nodes]
        ranks = sorted(s["group_rank"] for s in starts)
        return {"ok": True, "round": rnd, "time_s": max(s["t"] for s in starts) - t_ref,
                "ranks_ok": ranks == list(range(len(nodes)))}

    def _state(self, rnd: int) -> dict:
        """What etcd holds now (read after the scenario's counters were taken): round key, nodes, joins."""
        try:
            keys = Keys(ROOT, self.run_id, 1)
            kv, _ = self.client.get(keys.round(), deadline=10)
            nodes, _ = self.client.get_prefix(keys.nodes(), deadline=10)
            joins, _ = self.client.get_prefix(keys.joins(rnd + 1), deadline=10)
            return {"round": json.loads(kv.value) if kv else None, "registered": len(nodes),
                    f"joined_round_{rnd + 1}": len(joins)}
        except Exception as exc:  # noqa: BLE001 - a diagnostic only
            return {"error": f"{type(exc).__name__}: {exc}"}

    # --- scenarios ------------------------------------------------------------------------------------------
    def first(self) -> dict:
        deadline = self._cap()
        for c in self.fleet.children:
            c.send(cmd="start")
        count = len(self.fleet.children)
        if not self.board.wait(lambda: len(self.board.replies["launched"]) == count, deadline):
            return {"ok": False, "time_s": None, "reached": "not every process started its agents"}
        launched = self.board.replies["launched"]
        t_first, t_last = min(m["t_first"] for m in launched), max(m["t_last"] for m in launched)
        rnd, why = self._wait_next_round(0, self.fleet.nodes, deadline)
        out = self._finish(rnd, why, self.fleet.nodes, t_last)
        out["start_spread_s"] = t_last - t_first
        if out["ok"]:
            out["from_first_s"] = out["time_s"] + t_last - t_first
        return out

    def idle(self) -> dict:
        threading.Event().wait(self.args.idle)  # a measurement window, not a synchronization
        return {"ok": True, "time_s": None, "window_s": self.args.idle}

    def leave(self) -> dict:
        deadline = self._cap()
        prev = max(self.board.starts)
        by_rank = sorted((s["group_rank"], n) for n, s in self.board.starts[prev].items() if n != self.fleet.victim)
        self.leaver = next((n for r, n in by_rank if r >= self.n // 2), by_rank[-1][1])
        self.fleet.child_of[self.leaver].send(cmd="leave", node=self.leaver)
        if not self.board.wait(lambda: any(m["node"] == self.leaver for m in self.board.replies["left"]), deadline):
            return {"ok": False, "time_s": None, "reached": "the leave was not acknowledged"}
        t = next(m["t"] for m in self.board.replies["left"] if m["node"] == self.leaver)
        self.survivors = [n for n in self.fleet.nodes if n != self.leaver]
        rnd, why = self._wait_next_round(prev, self.survivors, deadline)
        return {**self._finish(rnd, why, self.survivors, t), "leaver": self.leaver}

    def lost(self) -> dict:
        deadline = self._cap()
        prev, victim = max(self.board.starts), self.fleet.victim
        lease = self.board.latest[victim]["lease"]
        child = self.fleet.child_of[victim]
        child.cpu()  # its last CPU reading, before it is gone
        child.kill()  # SIGKILL and reap: from here on nothing of this agent touches etcd
        t = time.monotonic()
        self.client.lease_revoke(lease, deadline=30)
        self.survivors = [n for n in self.survivors if n != victim]
        rnd, why = self._wait_next_round(prev, self.survivors, deadline)
        return {**self._finish(rnd, why, self.survivors, t), "victim": victim, "lease": f"{lease:x}"}

    def exit(self) -> dict:
        deadline = self._cap()
        t = time.monotonic()
        for c in self.fleet.children:
            if c.proc.poll() is None:
                c.send(cmd="end_workers", code=0)
        nodes = self.survivors
        self.board.wait(lambda: all(n in self.board.done for n in nodes), deadline)
        with self.board.cond:
            done = [self.board.done[n] for n in nodes if n in self.board.done]
        if len(done) < len(nodes):
            return {"ok": False, "time_s": None,
                    "reached": f"did not finish within {self.args.cap:g} s; {len(done)} of {len(nodes)} agents "
                               "returned"}
        bad = [f"{d['node']}: {d['error'] or d['code']}" for d in done if d["code"] != 0]
        return {"ok": not bad, "time_s": max(d["t"] for d in done) - t,
                "reached": "; ".join(bad[:3]) if bad else "every agent returned 0"}

    # --- the run --------------------------------------------------------------------------------------------
    def measure(self, name: str) -> dict:
        m0, cpu0, ecpu0, t0 = etcd_metrics.scrape(self.etcd.client_url), self.fleet.cpu(), cpu_of(self.etcd_ps), \
            time.monotonic()
        s0 = schedstat(self.etcd.pid)
        out = getattr(self, name)()
        wall = time.monotonic() - t0
        m1, cpu1, ecpu1 = etcd_metrics.scrape(self.etcd.client_url), self.fleet.cpu(), cpu_of(self.etcd_ps)
        s1 = schedstat(self.etcd.pid)
        out.update(wall_s=wall, etcd=etcd_metrics.diff(m0, m1), agent_cpu_s=cpu1 - cpu0, etcd_cpu_s=ecpu1 - ecpu0,
                   etcd_runqueue_wait_s=s1[1] - s0[1])
        if not out["ok"]:
            out["state"] = self._state(prev_round(self.board))  # read after the counters: not counted
        return out

    def run(self) -> dict:
        args, n = self.args, self.n
        k = math.ceil((n - 1) / args.procs) if args.procs else args.agents_per_proc
        t0 = time.monotonic()
        data_dir = tempfile.mkdtemp(prefix=f"etcd-scale-{n}-", dir=args.etcd_dir)
        self.etcd = EtcdServer(name=f"scale-{n}", data_dir=data_dir, extra_args=ETCD_ARGS + tuple(args.etcd_arg),
                               log_file=str(self.workdir / "etcd.log"))
        self.fleet = self.client = None
        try:
            self.etcd.start()
            self.etcd_ps = psutil.Process(self.etcd.pid)
            self.result["etcd_priority"] = prioritize(self.etcd.pid)
            self.client = Etcd(EtcdConfig(parse_endpoints(self.etcd.endpoint)))
            self.result["etcd_version"] = self.client.status()
            last_call = args.last_call if args.last_call is not None else args.cap + 60
            params = {"endpoint": self.etcd.endpoint, "run_id": self.run_id, "min_nodes": max(1, n - 2),
                      "max_nodes": n, "lease_ttl": args.lease_ttl, "last_call": last_call,
                      "join_timeout": max(600.0, 4 * args.cap), "max_restarts": 10,
                      "etcd_timeout": args.etcd_timeout if args.etcd_timeout is not None else args.cap}
            self.fleet = Fleet(n, k)
            self.fleet.spawn({"params": params, "log_level": args.log_level, "nice": args.agent_nice}, self.workdir,
                             self.board)
            self.result.update(procs=len(self.fleet.children), agents_per_proc=k, params=params)
            count = len(self.fleet.children)
            if not self.board.wait(lambda: len(self.board.replies["ready"]) == count, time.monotonic() + 120):
                raise RuntimeError(f"only {len(self.board.replies['ready'])} of {count} processes became ready")
            self.result["setup_s"] = time.monotonic() - t0
            for name in SCENARIOS:
                out = self.measure(name)
                self.result["scenarios"][name] = out
                self.save()
                print(f"  N={n} {name}: " + scale_report.one_line(out), flush=True)
                if not out["ok"]:
                    self.result["notes"].append(f"{name} did not finish; later scenarios were not run")
                    break
        except Exception as exc:  # the error is recorded and the next N still runs
            self.result["error"] = f"{type(exc).__name__}: {exc}"
            self.result["traceback"] = traceback.format_exc(limit=6)
            print(f"  N={n}: error: {self.result['error']}", flush=True)
        finally:
            if self.fleet is not None:
                self.fleet.close()
            if self.client is not None:
                self.client.close()
            self.etcd.stop()
            shutil.rmtree(data_dir, ignore_errors=True)
            self.result["session_losses"] = count_lines(self.workdir.glob("proc-*.log"), "session lost")
            left = [p.pid for p in psutil.Process().children(recursive=True)]
            if left:
                self.result["notes"].append(f"processes left behind: {left}")
            self.result["wall_s"] = time.monotonic() - t0
            self.save()
        return self.result


def prev_round(board: Board) -> int:
    with board.cond:
        return max(board.starts, default=0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="10,100,300,1000", help="comma-separated N values (default 10,100,300,1000)")
    p.add_argument("--out", default="scale-out", help="output directory (default scale-out/)")
    p.add_argument("--agents-per-proc", type=int, default=25, help="agents per process, K (default 25)")
    p.add_argument("--procs", type=int, default=0, help="processes for the N-1 agents (overrides --agents-per-proc)")
    p.add_argument("--cap", type=float, default=240.0, help="seconds each scenario may take (default 240)")
    p.add_argument("--lease-ttl", type=int, default=60, help="the agents' --lease-ttl (default 60; see the module doc)")
    p.add_argument("--last-call", type=float, default=None, help="default: cap + 60 (see the module doc)")
    p.add_argument("--etcd-timeout", type=float, default=None,
                   help="the agents' --etcd-timeout (default: the cap; see the module doc)")
    p.add_argument("--agent-nice", type=int, default=19, help="nice value of the agent processes (default 19)")
    p.add_argument("--idle", type=float, default=5.0, help="seconds of the idle window after round 1 (default 5)")
    p.add_argument("--etcd-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where etcd's data directory goes (default /dev/shm: tmpfs)")
    p.add_argument("--etcd-arg", action="append", default=[], help="an extra etcd flag (repeatable), e.g. "
                   "--etcd-arg=--enable-pprof")
    p.add_argument("--report-only", action="store_true", help="only rewrite results.md and results.png from the "
                   "results.json in --out")
    p.add_argument("--log-level", default="WARNING", help="the agents' log level (logs in work/N<n>/)")
    return p.parse_args(argv)


def meta(args) -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except OSError:
        commit = ""
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "python": platform.python_version(),
            "cpus": os.cpu_count(), "platform": platform.platform(), "etcd_agent": os.path.dirname(etcd_agent.__file__),
            "repo_head": commit, "args": vars(args), "etcd_args": ETCD_ARGS}


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = [int(x) for x in args.nodes.split(",") if x.strip()]
    if any(n < 3 for n in sizes):
        sys.exit("--nodes: every N must be at least 3 (one leaves, one is lost, one job goes on)")
    out = Path(args.out)
    if args.report_only:
        return report(json.loads((out / "results.json").read_text()), out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "work", ignore_errors=True)
    result = {"meta": meta(args), "runs": []}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(result, indent=1))

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: a background job inherits it ignored
        signal.signal(sig, on_term)
    try:
        for n in sizes:
            workdir = out / "work" / f"N{n}"
            workdir.mkdir(parents=True, exist_ok=True)
            print(f"N={n}: starting", flush=True)
            run = Run(n, args, workdir, save)
            result["runs"].append(run.result)
            run.run()
            print(f"N={n}: {run.result['wall_s']:.1f} s in all", flush=True)
    except KeyboardInterrupt:
        print("interrupted; every process was stopped", flush=True)
        result["meta"]["interrupted"] = True
    save()
    return report(result, out)


def report(result: dict, out: Path) -> int:
    table = scale_report.markdown(result)
    (out / "results.md").write_text(table)
    note = scale_report.plot(result, out / "results.png")
    print(f"\n{table}\n{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
