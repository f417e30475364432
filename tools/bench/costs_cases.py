"""The operation loops of ``costs.py``: each case is prepared (keys written, streams opened, a warm-up done) before
its measured ``run``, which returns one latency per operation, and cleaned up after by ``close``.

Imports the project's etcd client, keepalive stream and watch (``etcd_agent.etcd``) and the standard library.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable

from etcd_agent.config import EtcdConfig
from etcd_agent.etcd.client import Etcd, mod_is, op_first_created, op_get, op_put, rpc
from etcd_agent.etcd.keepalive import KeepAliveStream
from etcd_agent.etcd.watch import Watch, WatchStream
from etcd_agent.testing import metrics as etcd_metrics

VALUE = b'{"v": 1, "host": "node-00042.cluster.example", "addr": "10.11.12.13", "port": 29500, "pid": 123456, ' \
        b'"prev_rank": 42, "time": 1765000000.123, "nproc": 8, "version": "0.9.0", "pad": "' + b"x" * 40 + b'"}'
ROUND = b'{"v": 1, "round": 7, "phase": "joining", "reason": "a worker failed", "time": 1765000000.123}'
WARM = 20


@dataclasses.dataclass
class Case:
    run: Callable[[], list[float]]
    units: int
    unit: str = "op"
    close: Callable[[], None] = lambda: None
    extra: dict = dataclasses.field(default_factory=dict)


def timed(count: int, op: Callable[[int], object]) -> Callable[[], list[float]]:
    def run() -> list[float]:
        out = []
        for i in range(count):
            t = time.perf_counter()
            op(i)
            out.append(time.perf_counter() - t)
        return out
    return run


def keepalive(etcd: Etcd, count: int, prefix: str) -> Case:
    lease = etcd.lease_grant(60)
    stream = KeepAliveStream(etcd, lease)
    for _ in range(WARM):
        stream.ping(5.0)

    def close() -> None:
        stream.close()
        etcd.lease_revoke(lease)
    return Case(timed(count, lambda _i: stream.ping(5.0)), count, "keepalive", close)


def keepalives_at_once(etcd: Etcd, count: int, prefix: str, threads: int = 8) -> Case:
    """``threads`` leases kept alive at once, each from a thread of its own: what concurrency (etcd batching and
    amortizing its work over requests in flight together) does to the cost of one keepalive."""
    leases = [etcd.lease_grant(60) for _ in range(threads)]
    streams = [KeepAliveStream(etcd, lease) for lease in leases]
    each = max(1, count // threads)

    def run() -> list[float]:
        out: list[list[float]] = [[] for _ in streams]
        workers = [threading.Thread(target=lambda s=s, o=o: o.extend(timed(each, lambda _i: s.ping(5.0))()))
                   for s, o in zip(streams, out)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return [t for o in out for t in o]
    for s in streams:
        s.ping(5.0)

    def close() -> None:
        for s, lease in zip(streams, leases):
            s.close()
            etcd.lease_revoke(lease)
    return Case(run, each * threads, "keepalive", close, {"threads": threads})


def txn(etcd: Etcd, count: int, prefix: str) -> Case:
    """The write of the close, bump and join txns: guarded by the round key's mod revision, one leased ~200 B key."""
    lease = etcd.lease_grant(600)
    fence = etcd.put(f"{prefix}/round", ROUND)

    def op(i: int) -> None:
        if not etcd.txn([mod_is(f"{prefix}/round", fence)], [op_put(f"{prefix}/key-{i:06d}", VALUE, lease)]).succeeded:
            raise RuntimeError("the guarded txn failed its compare")
    for i in range(count, count + WARM):
        op(i)
    return Case(timed(count, op), count, "txn", lambda: etcd.lease_revoke(lease), {"value_bytes": len(VALUE)})


def join(keys: int) -> Callable[[Etcd, int, str], Case]:
    """The agent's join txn as ``coord/txns.join`` builds it, in a round that ``keys`` nodes joined already: the
    guarded put of one's join key (an existing one, so the round keeps its size), the key read back, and the
    oldest 16 join keys (a range sorted by create revision: etcd reads every key of the range to sort it)."""
    def make(etcd: Etcd, count: int, prefix: str) -> Case:
        lease = etcd.lease_grant(600)
        fence = etcd.put(f"{prefix}/round", ROUND)
        joins = f"{prefix}/r/00000007/join/"
        for start in range(0, keys, 100):
            etcd.txn([], [op_put(f"{joins}node-{i:06d}", VALUE, lease) for i in range(start, min(keys, start + 100))])

        def op(i: int) -> None:
            key = f"{joins}node-{i % keys:06d}"
            res = etcd.txn([mod_is(f"{prefix}/round", fence)], [op_put(key, VALUE, lease), op_get(key),
                                                                 op_first_created(joins, 16)])
            if not res.succeeded:
                raise RuntimeError("the join txn failed its compare")
        for i in range(WARM):
            op(i)
        return Case(timed(count, op), count, "txn", lambda: etcd.lease_revoke(lease), {"round_keys": keys})
    return make


def put(etcd: Etcd, count: int, prefix: str) -> Case:
    return watched(etcd, count, prefix, 0)


def watched(etcd: Etcd, count: int, prefix: str, watchers: int) -> Case:
    """``count`` puts of one key with ``watchers`` watchers on it; each put waits for every watcher's event."""
    key = f"{prefix}/key"
    got = [0]
    cond = threading.Condition()

    def sink(delivery) -> None:
        with cond:
            got[0] += len(delivery) if isinstance(delivery, list) else 0
            cond.notify_all()
    rev = etcd.put(key, VALUE)
    watches = [Watch(etcd, key, rev + 1, sink, probe_interval=3600.0, name=f"costs-watch-{i}", range_end=b"").start()
               for i in range(watchers)]

    def op(_i: int) -> None:
        with cond:
            want = got[0] + watchers
        etcd.put(key, VALUE)
        with cond:
            if not cond.wait_for(lambda: got[0] >= want, timeout=30.0):
                raise RuntimeError(f"{want - got[0]} watch events did not arrive within 30 s")
    for i in range(WARM):
        op(i)

    def close() -> None:
        for w in watches:
            w.cancel(wait=False)
    return Case(timed(count, op), count, "put", close, {"watchers": watchers})


def ranged(size: int) -> Callable[[Etcd, int, str], Case]:
    def make(etcd: Etcd, count: int, prefix: str) -> Case:
        key = f"{prefix}/plan"
        etcd.put(key, b"p" * size)
        for _ in range(WARM):
            etcd.get(key)
        return Case(timed(count, lambda _i: etcd.get(key)), count, "read", extra={"value_bytes": size})
    return make


def progress(etcd: Etcd, count: int, prefix: str) -> Case:
    """A raw Watch stream with one watcher: each progress request waits for its answer."""
    channel, auth = etcd.channel_and_auth()
    requests: queue.SimpleQueue = queue.SimpleQueue()
    call = rpc.WatchStub(channel).Watch(iter(requests.get, None), **auth)
    requests.put(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(key=f"{prefix}/round".encode(),
                                                                        progress_notify=True)))
    answers = iter(call)
    if not next(answers).created:
        raise RuntimeError("the watch was not created")

    def op(_i: int) -> None:
        requests.put(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
        resp = next(answers)
        if resp.events or resp.created:
            raise RuntimeError("a progress request got another answer")
    for i in range(WARM):
        op(i)

    def close() -> None:
        requests.put(None)
        call.cancel()
    return Case(timed(count, op), count, "progress request", close)


CASES = [("keepalive", keepalive, 3000), ("keepalive-x8", keepalives_at_once, 4000), ("txn", txn, 2000),
         ("join-100", join(100), 1000),
         ("join-1000", join(1000), 500), ("join-4000", join(4000), 150), ("put", put, 2000),
         ("watch-1", lambda e, c, p: watched(e, c, p, 1), 2000),
         ("watch-10", lambda e, c, p: watched(e, c, p, 10), 1000),
         ("watch-100", lambda e, c, p: watched(e, c, p, 100), 300),
         ("range-1k", ranged(1024), 2000), ("range-10k", ranged(10 * 1024), 1500),
         ("range-100k", ranged(100 * 1024), 600), ("progress", progress, 3000)]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def settled_watchers(server, want: float, timeout: float = 30.0) -> float:
    """etcd's watcher gauge once it reaches ``want`` (watch creations are asynchronous; a gauge has no event to
    wait on, so it is polled), or its value at the deadline."""
    deadline = time.monotonic() + timeout
    while (now := etcd_metrics.scrape(server.client_url)["watchers"]) < want and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


def agents_memory(server, count: int, log) -> dict:
    """``count`` idle agent skeletons, each its own connection with a lease, its keepalive stream, one leased key and
    one watch stream of three ranges: etcd's RSS and watcher gauge before and after, per agent."""
    before, watchers0 = rss(server.pid), etcd_metrics.scrape(server.client_url)["watchers"]
    made = []
    cfg = EtcdConfig(endpoints=((server.host, server.client_port),))
    try:
        for i in range(count):
            etcd = Etcd(cfg)
            lease = etcd.lease_grant(600)
            ka = KeepAliveStream(etcd, lease)
            ka.ping(5.0)
            rev = etcd.put(f"/costs/agents/nodes/node-{i:05d}", VALUE, lease)
            stream = WatchStream(etcd, lambda *_a: None, probe_interval=3600.0, name=f"costs-agent-{i}").start()
            for j, key in enumerate(("round", f"r/join/node-{i - 1:05d}", "result")):
                stream.add(str(j), f"/costs/agents/{key}", b"", rev + 1)
            made.append((etcd, ka, stream))
        watchers1 = settled_watchers(server, watchers0 + 3 * count)
        after = rss(server.pid)
    finally:
        for etcd, ka, stream in made:
            stream.cancel(wait=False)
            ka.close()
            etcd.close()
    out = {"agents": count, "rss_before": before, "rss_after": after, "rss_per_agent": (after - before) / count,
           "watchers_per_agent": (watchers1 - watchers0) / count}
    log(f"agents: {count}, etcd RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB "
        f"({out['rss_per_agent'] / 1024:.1f} KiB per agent), {out['watchers_per_agent']:.1f} watchers per agent")
    return out
