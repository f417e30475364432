"""What one etcd operation costs etcd, measured: the inputs of the model of a large job (``costs_model.py``,
docs/scale-model.md).

    flock /tmp/bench.lock .venv/bin/python tools/bench/costs.py --out DIR [--scale 1.0] [--no-cluster]

For each operation kind, a loop of many operations, one after the other, with the project's own client
(``etcd_agent.etcd.client.Etcd``, its ``KeepAliveStream`` and ``Watch``) or, for the progress request, a raw
Watch stream over the client's channel:

- ``keepalive``: one keepalive on an open LeaseKeepAlive stream (``KeepAliveStream.ping``), as the session sends;
- ``txn``: a txn guarded by a key's mod revision that writes one ~200 B leased key and reads the oldest key of a
  prefix, like the agent's join txn (``coord/txns.py``);
- ``put``: a plain 200 B put with no watcher (the base of the next line);
- ``watch-W``: the same put with W watchers of the key (W = 1, 10, 100, each a ``Watch`` on a stream of its own, as
  agents have one stream each); each put waits until every watcher got its event. The cost per event delivered is
  (cost per put with W watchers - cost per put without) / W;
- ``range-1k``, ``range-10k``, ``range-100k``: a range read of one key of that size; cost per KB read is the slope
  between 1 KB and 100 KB, the fixed cost what is left of the 1 KB read;
- ``progress``: one watch progress request on a stream with one watcher, and its answer;
- ``agents``: A idle agent skeletons (a connection, a lease with its keepalive stream, a leased key, a watch stream
  with three ranges): etcd's resident memory and its watchers per agent.

What is measured for each, over the loop: etcd's CPU seconds (utime + stime of the etcd process from
/proc/PID/stat, less its idle rate measured before), the bytes etcd's ``/metrics`` says it sent to and received
from clients (``etcd_network_client_grpc_sent_bytes_total`` / ``received``), this process's CPU (the client side:
``time.process_time``) and the latency of each operation (median, p99). The metrics are read outside the CPU
window, so their scrape is not counted.

Where: one etcd (``EtcdServer``: etcd's defaults plus a 4 GiB quota, data on tmpfs), and, unless ``--no-cluster``, a
3-member cluster (``testing.cluster.EtcdCluster``) where each kind runs twice, its client on the leader and on a
follower, with every member's CPU counted: a follower forwards keepalives and writes to the leader, and every
member applies every write. The agent's client picks one member at random (python-etcd3's
``MultiEndpointEtcd3Client``), so the model weighs the two by 1/3 and 2/3 (``mix``).

Writes into --out: results.json and results.md (the per-operation table, then the model of ``costs_model``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import costs_model
from costs_cases import CASES, agents_memory

from etcd_agent.config import EtcdConfig
from etcd_agent.etcd.client import Etcd
from etcd_agent.etcd.server import EtcdServer
from etcd_agent.etcd.waits import quiet_grpc_waits
from etcd_agent.testing import metrics as etcd_metrics
from etcd_agent.testing.cluster import EtcdCluster

TICK = os.sysconf("SC_CLK_TCK")
ETCD_ARGS = ("--quota-backend-bytes=4294967296",)
BYTES = {"sent": "etcd_network_client_grpc_sent_bytes_total",
         "received": "etcd_network_client_grpc_received_bytes_total"}


def cpu_s(pid: int) -> float:
    """utime + stime of a process, all its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def net_bytes(server: EtcdServer) -> dict[str, float]:
    series = etcd_metrics.read(server.client_url)
    return {k: sum(v for n, _lab, v in series if n == metric) for k, metric in BYTES.items()}


def idle_rates(servers: list[EtcdServer], seconds: float) -> list[float]:
    """Each server's CPU seconds per second while nothing is asked of it."""
    before = [cpu_s(s.pid) for s in servers]
    time.sleep(seconds)
    return [(cpu_s(s.pid) - b) / seconds for s, b in zip(servers, before)]


def measure(servers: list[EtcdServer], idle: list[float], case, served: int, leader: int) -> dict:
    """Run a prepared case's loop; what it cost each server, per unit of the case."""
    net0 = [net_bytes(s) for s in servers]
    cpu0, t0, c0 = [cpu_s(s.pid) for s in servers], time.monotonic(), time.process_time()
    latencies = case.run()
    cpu1, t1, c1 = [cpu_s(s.pid) for s in servers], time.monotonic(), time.process_time()
    net1 = [net_bytes(s) for s in servers]
    wall = t1 - t0
    per_member = [max(0.0, b - a - r * wall) / case.units for a, b, r in zip(cpu0, cpu1, idle)]
    lat = sorted(latencies)
    return {"units": case.units, "unit": case.unit, "wall_s": wall, "cpu": sum(per_member), "members_cpu": per_member,
            "leader": per_member[leader], "served": per_member[served],
            "sent": sum(b["sent"] - a["sent"] for a, b in zip(net0, net1)) / case.units,
            "received": sum(b["received"] - a["received"] for a, b in zip(net0, net1)) / case.units,
            "client_cpu": (c1 - c0) / case.units, "p50_ms": 1e3 * statistics.median(lat),
            "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], **case.extra}


def run_cases(servers: list[EtcdServer], leader: int, targets: dict[str, int], scale: float, log) -> dict:
    """Every case against each target member (label -> index); results keyed ``kind@label``."""
    idle = idle_rates(servers, 5.0)
    out = {"idle_cpu_per_s": idle}
    for label, index in targets.items():
        s = servers[index]
        etcd = Etcd(EtcdConfig(endpoints=((s.host, s.client_port),)))
        try:
            for name, make, count in CASES:
                case = make(etcd, max(20, int(count * scale)), f"/costs/{label}/{name}")
                try:
                    res = measure(servers, idle, case, index, leader)
                finally:
                    case.close()
                out[f"{name}@{label}"] = res
                log(f"{name}@{label}: {res['units']} {res['unit']}s, etcd {1e6 * res['cpu']:.0f} us "
                    f"(leader {1e6 * res['leader']:.0f}), sent {res['sent']:.0f} B, received {res['received']:.0f} B, "
                    f"client {1e6 * res['client_cpu']:.0f} us, p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms")
        finally:
            etcd.close()
    return out


def mix(res: dict, members: int) -> dict:
    """The per-unit costs the model takes (``costs_model.KINDS``), for a client on a random member: on one member
    the cases as measured; on several, 1/members of the case on the leader plus the rest of the case on a follower.
    event = (watch-100 - put) / 100 per put; read_kb = (range-100k - range-1k) / 99; read_fixed = range-1k - read_kb;
    join_key = (join-4000 - join-1000) / 3000; join_fixed = join-100 - 100 x join_key."""
    def at(name: str) -> dict:
        if members == 1:
            return {k: res[f"{name}@single"][k] for k in ("cpu", "leader", "sent", "received")}
        lead, fol = res[f"{name}@leader"], res[f"{name}@follower"]
        return {k: (lead[k] + (members - 1) * fol[k]) / members for k in ("cpu", "leader", "sent", "received")}

    def combine(a: dict, b: dict, fa: float, fb: float) -> dict:
        return {k: fa * a[k] + fb * b[k] for k in ("cpu", "leader", "sent", "received")}
    put, watch = at("put"), at("watch-100")
    r1, r100 = at("range-1k"), at("range-100k")
    read_kb = combine(r100, r1, 1 / 99, -1 / 99)
    j100, j1000, j4000 = at("join-100"), at("join-1000"), at("join-4000")
    join_key = combine(j4000, j1000, 1 / 3000, -1 / 3000)
    return {"keepalive": at("keepalive"), "txn": at("txn"), "progress": at("progress"),
            "join_key": join_key, "join_fixed": combine(j100, join_key, 1.0, -100.0),
            "event": combine(watch, put, 1 / 100, -1 / 100),
            "read_kb": read_kb, "read_fixed": combine(r1, read_kb, 1.0, -1.0)}


def table(res: dict, title: str) -> str:
    lines = [f"### {title}", "", "| operation | unit | etcd CPU us (all members) | leader us | served by us | "
             "sent B | received B | client CPU us | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in res.items():
        if not isinstance(r, dict) or "cpu" not in r:
            continue
        lines.append(f"| {key} | {r['unit']} | {1e6 * r['cpu']:.1f} | {1e6 * r['leader']:.1f} | "
                     f"{1e6 * r['served']:.1f} | {r['sent']:.0f} | {r['received']:.0f} | {1e6 * r['client_cpu']:.0f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def per_event(res: dict) -> str:
    """The marginal cost of one watch event delivered, (watch-W - put) / W, for each W and target measured."""
    lines = ["| watchers | target | etcd CPU us per event (all members) | served by us | sent B per event |",
             "|---|---|---|---|---|"]
    for key, r in res.items():
        if not key.startswith("watch-"):
            continue
        w, target = r["watchers"], key.split("@")[1]
        base = res[f"put@{target}"]
        lines.append(f"| {w} | {target} | {1e6 * (r['cpu'] - base['cpu']) / w:.1f} | "
                     f"{1e6 * (r['served'] - base['served']) / w:.1f} | {(r['sent'] - base['sent']) / w:.0f} |")
    return "\n".join(lines) + "\n"


def single(args, log) -> dict:
    data = tempfile.mkdtemp(prefix="etcd-costs-", dir=args.etcd_dir)
    try:
        with EtcdServer(name="costs", data_dir=data, extra_args=ETCD_ARGS) as server:
            res = run_cases([server], 0, {"single": 0}, args.scale, log)
            res["agents"] = agents_memory(server, max(10, int(args.agents * args.scale)), log)
    finally:
        shutil.rmtree(data, ignore_errors=True)  # a data dir we name is ours to remove (tmpfs holds it in memory)
    return res


def cluster(args, log) -> dict:
    base = tempfile.mkdtemp(prefix="etcd-costs-3-", dir=args.etcd_dir)
    try:
        with EtcdCluster(3, name_prefix="costs", extra_args=ETCD_ARGS, base_dir=base) as c:
            leader = c.leader_index()
            follower = (leader + 1) % 3
            res = run_cases(c.members, leader, {"leader": leader, "follower": follower}, args.scale, log)
            res["leader_index"] = leader
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every loop's count (default 1)")
    p.add_argument("--agents", type=int, default=200, help="agent skeletons for the memory case (default 200)")
    p.add_argument("--no-cluster", action="store_true", help="only the single etcd")
    p.add_argument("--etcd-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    quiet_grpc_waits()  # the clients here wait as an agent's do (they did since etcd.client's import set it)

    def log(msg: str) -> None:
        print(f"[costs {time.strftime('%H:%M:%S')}] {msg}", flush=True)
    result = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "python": platform.python_version(),
              "cpus": os.cpu_count(), "platform": platform.platform(), "cpu_model": cpu_model()}
    result["single"] = single(args, log)
    result["etcd_version"] = etcd_version()
    result["unit"] = {"single": mix(result["single"], 1)}
    if not args.no_cluster:
        result["three"] = cluster(args, log)
        result["unit"]["three"] = mix(result["three"], 3)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "results.md").write_text(report(result))
    print(report(result))
    return 0


def report(result: dict) -> str:
    parts = [f"Measured on {result['cpu_model']} ({result['cpus']} CPUs), etcd {result['etcd_version']}, "
             f"{result['started']}.\n", table(result["single"], "one etcd member"), per_event(result["single"])]
    if "three" in result:
        parts += [table(result["three"], "three members (client on the leader, then on a follower)"),
                  per_event(result["three"])]
    agents = result["single"].get("agents")
    if agents:
        parts.append(f"Idle agents: {agents['agents']} skeletons, etcd RSS +{agents['rss_per_agent'] / 1024:.1f} KiB "
                     f"per agent, {agents['watchers_per_agent']:.1f} watchers per agent.\n")
    for where, unit in result["unit"].items():
        members = 3 if where == "three" else 1
        parts.append(f"## Model at {where} ({members} member(s))\n\n"
                     + costs_model.model_markdown(costs_model.derive(unit, members=members)))
    return "\n".join(parts)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


def etcd_version() -> str:
    import subprocess

    from etcd_agent.etcd.server import find_etcd_binary
    out = subprocess.run([find_etcd_binary(), "--version"], capture_output=True, text=True).stdout
    return out.split("\n", 1)[0].split(":", 1)[-1].strip()


if __name__ == "__main__":
    sys.exit(main())
