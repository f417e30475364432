"""What one etcd operation costs the CLIENT (this process's CPU), measured: the Python overhead of the project's
etcd client per unary call and per stream message, next to a raw gRPC call for the floor.

    flock /tmp/bench.lock .venv/bin/python tools/bench/costs_client.py [--count 3000] [--out DIR]

Against a private etcd (``EtcdServer``, data on tmpfs), each case runs many operations one after the other and
reports, per operation, the calling thread's CPU (``time.thread_time``: the caller's own share) and the whole
process's CPU (``time.process_time``: with gRPC's threads and the stream loop's), and the stream loop thread's
alone (``streams_loop.LOOP``, from /proc: a 10 ms clock tick, so use thousands of operations), in microseconds, and
the loop's turns and wake-ups (``call_soon_threadsafe``) per operation (counts: what the machine's load does not move):

- ``raw-get``: a Range on the blocking stub with no wrapper at all (gRPC's own floor);
- ``get``: ``Etcd.get`` of one key; ``txn``: ``Etcd.txn`` with one compare, one put and one get, as the agent's;
- ``keepalive``: ``KeepAliveStream.ping`` on an open stream (the session's renewal); ``keepalive-xW``: W streams
  pinged at once, each by a thread of its own (the loop shared by many agents; no caller thread column);
- ``watch-event``: one event delivered to each of W ranges of W ``WatchStream`` s (W = 20) per put; reported per
  event, less the put's own cost (the ``put`` line).
The numbers move with the machine and its load: compare runs made on the same machine, one after the other.
Writes results.json into --out when given. Imports the project's etcd client, keepalive and watch.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from etcd_agent.config import EtcdConfig
from etcd_agent.etcd.client import Etcd, mod_is, op_get, op_put, rpc
from etcd_agent.etcd.keepalive import KeepAliveStream
from etcd_agent.etcd.server import EtcdServer
from etcd_agent.etcd.streams_loop import LOOP
from etcd_agent.etcd.waits import quiet_grpc_waits
from etcd_agent.etcd.watch import WatchStream

TICK = os.sysconf("SC_CLK_TCK")
VALUE = b'{"v": 1, "host": "node-00042.cluster.example", "addr": "10.11.12.13", "port": 29500}' + b"x" * 100


def loop_cpu() -> float:
    """CPU seconds of the stream loop's thread so far (0 before it started)."""
    thread = LOOP._thread
    if thread is None or thread.native_id is None:
        return 0.0
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class LoopCounts:
    """How many turns the stream loop took and how many wake-ups (``call_soon_threadsafe``) it was handed: counts,
    which the machine's load does not move, beside the CPU, which it does."""

    def __init__(self):
        self.turns = self.wakes = 0
        loop = LOOP.loop()
        run_once, wake = loop._run_once, loop.call_soon_threadsafe

        def turn() -> None:
            self.turns += 1
            run_once()

        def woken(*args, **kwargs):
            self.wakes += 1
            return wake(*args, **kwargs)
        loop._run_once, loop.call_soon_threadsafe = turn, woken

    def now(self) -> tuple[int, int]:
        return self.turns, self.wakes


COUNTS: LoopCounts | None = None


def per_unit(res: dict, began: tuple[int, int], units: int) -> dict:
    turns, wakes = COUNTS.now()
    res.update(turns=(turns - began[0]) / units, wakes=(wakes - began[1]) / units)
    return res


def measure(count: int, op: Callable[[int], object], per: int = 1) -> dict:
    """CPU per operation of ``count`` calls of ``op`` (after a warm-up), in us; ``per`` units per call."""
    for i in range(min(50, count)):
        op(i)
    began = COUNTS.now()
    wall, thread, proc, loop = time.perf_counter(), time.thread_time(), time.process_time(), loop_cpu()
    for i in range(count):
        op(i)
    units = count * per
    return per_unit({"thread_us": (time.thread_time() - thread) / units * 1e6,
                     "process_us": (time.process_time() - proc) / units * 1e6,
                     "loop_us": (loop_cpu() - loop) / units * 1e6,
                     "wall_us": (time.perf_counter() - wall) / units * 1e6, "count": units}, began, units)


def cases(etcd: Etcd, count: int, watchers: int) -> dict:
    out = {}
    etcd.put("/bench/key", VALUE)
    client = etcd.client
    req = rpc.RangeRequest(key=b"/bench/key")
    out["raw-get"] = measure(count, lambda _i: client.kvstub.Range(req, timeout=5.0))
    out["get"] = measure(count, lambda _i: etcd.get("/bench/key"))
    rev = [etcd.put("/bench/txn", VALUE)]

    def txn(_i: int) -> None:
        res = etcd.txn([mod_is("/bench/txn", rev[0])], [op_put("/bench/txn", VALUE), op_get("/bench/key")])
        rev[0] = res.revision
    out["txn"] = measure(count, txn)
    out["put"] = measure(count, lambda _i: etcd.put("/bench/w", VALUE))

    lease = etcd.lease_grant(60)
    stream = KeepAliveStream(etcd, lease)
    out["keepalive"] = measure(count, lambda _i: stream.ping(5.0))
    stream.close()
    etcd.lease_revoke(lease)

    out[f"keepalive-x{watchers}"] = concurrent_keepalives(etcd, count, watchers)

    got: queue.SimpleQueue = queue.SimpleQueue()
    rev0 = etcd.get("/bench/w")[1]
    streams = [WatchStream(etcd, lambda _n, _t, d: got.put(len(d)), name=f"bench-watch-{k}") for k in range(watchers)]
    for s in streams:
        s.add("w", "/bench/w", b"", rev0 + 1)
        s.start()
    probe_rev = etcd.put("/bench/w", VALUE)  # every stream is up once each delivered this one
    for _ in streams:
        got.get(timeout=30)

    def put_and_wait(_i: int) -> None:
        etcd.put("/bench/w", VALUE)
        seen = 0
        while seen < watchers:
            seen += got.get(timeout=30)
    res = measure(max(1, count // watchers), put_and_wait, per=watchers)
    put_share = {k: out["put"][k] / watchers for k in ("thread_us", "process_us")}
    res["process_us"] -= put_share["process_us"]
    out["watch-event"] = res
    for s in streams:
        s.cancel()
    del probe_rev
    return out


def concurrent_keepalives(etcd: Etcd, count: int, sessions: int) -> dict:
    """``sessions`` leases renewed at once, each by a thread of its own, as a simulation's agents do: what the
    stream loop costs per keepalive when many streams share it (per keepalive, over all threads)."""
    leases = [etcd.lease_grant(60) for _ in range(sessions)]
    streams = [KeepAliveStream(etcd, lease) for lease in leases]
    each = max(1, count // sessions)
    go = threading.Barrier(sessions + 1)

    def renew(stream: KeepAliveStream) -> None:
        go.wait()
        for _ in range(each):
            stream.ping(5.0)
    for stream in streams:
        stream.ping(5.0)
    threads = [threading.Thread(target=renew, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    began = COUNTS.now()
    wall, proc, loop = time.perf_counter(), time.process_time(), loop_cpu()
    go.wait()
    for t in threads:
        t.join()
    units = each * sessions
    res = per_unit({"thread_us": 0.0, "process_us": (time.process_time() - proc) / units * 1e6,
                    "loop_us": (loop_cpu() - loop) / units * 1e6, "wall_us": (time.perf_counter() - wall) / units * 1e6,
                    "count": units}, began, units)
    for stream, lease in zip(streams, leases):
        stream.close()
        etcd.lease_revoke(lease)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=3000, help="operations per case (default 3000)")
    p.add_argument("--watchers", type=int, default=20, help="watch streams for the watch-event case (default 20)")
    p.add_argument("--out", type=Path, help="where results.json goes")
    p.add_argument("--etcd-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = p.parse_args(argv)
    if args.count < 1:
        p.error("--count must be at least 1")
    if args.watchers < 1:
        p.error("--watchers must be at least 1")
    quiet_grpc_waits()
    global COUNTS
    COUNTS = LoopCounts()
    data = tempfile.mkdtemp(prefix="etcd-costs-client-", dir=args.etcd_dir)
    try:
        with EtcdServer(name="costs-client", data_dir=data) as server:
            etcd = Etcd(EtcdConfig(endpoints=((server.host, server.client_port),)))
            try:
                out = cases(etcd, args.count, args.watchers)
            finally:
                etcd.close()
    finally:
        shutil.rmtree(data, ignore_errors=True)
    print(f"{'case':<14} {'thread us':>9} {'loop us':>8} {'process us':>10} {'wall us':>8} {'turns':>6} {'wakes':>6}"
          f"  (per operation, {os.cpu_count()} cpus)")
    for name, r in out.items():
        print(f"{name:<14} {r['thread_us']:>9.1f} {r['loop_us']:>8.1f} {r['process_us']:>10.1f} {r['wall_us']:>8.1f} "
              f"{r['turns']:>6.2f} {r['wakes']:>6.2f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
