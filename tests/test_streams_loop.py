"""The process's one stream loop (``etcd_agent/etcd/streams_loop.py``): every keepalive and watch stream of every
etcd client in a process runs on it, so a stream costs no thread of its own (counts only, against a real etcd)."""

from __future__ import annotations

import asyncio
import queue
import threading

import psutil

from etcd_agent.config import EtcdConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.etcd.client import Etcd
from etcd_agent.etcd.keepalive import KeepAliveStream
from etcd_agent.etcd.streams_loop import LOOP, Stream
from etcd_agent.etcd.watch import WatchStream

WAIT = 60.0


def connections_to(port: int) -> int:
    """This process's established TCP connections to ``port``."""
    return sum(1 for c in psutil.Process().net_connections("tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def test_keepalive_streams_of_several_clients_add_no_thread_and_share_one_loop(own_etcd):
    """Three clients (the simulation runs 25 agents per process), a keepalive stream each, pinged on this thread:
    no thread is added (gRPC's blocking API added a reader and a request thread per stream, and a spin thread per
    channel), and every answer came through the one loop."""
    clients = [Etcd(EtcdConfig(parse_endpoints(own_etcd.endpoint))) for _ in range(3)]
    for e in clients:
        e.stream_channel_and_auth()  # the loop thread and gRPC's poller: once per process, not per stream
    before = {t.native_id for t in threading.enumerate()}
    streams = [KeepAliveStream(e, e.lease_grant(10)) for e in clients]
    try:
        for _ in range(3):
            for s in streams:
                granted, _sent = s.ping(timeout=WAIT)
                assert granted > 0
        added = [t.name for t in threading.enumerate() if t.native_id not in before]
        assert added == [], added
        assert [t.name for t in threading.enumerate()].count("etcd-streams") == 1
    finally:
        for s in streams:
            s.close()
        for e in clients:
            e.close()


def test_a_client_with_streams_holds_two_connections_to_its_member(own_etcd):
    """The streams' aio channel has the blocking channel's target and options but a TCP connection of its own (gRPC
    shares none between its two engines): 2 per client, the number a 10,000-node job multiplies."""
    e = Etcd(EtcdConfig(parse_endpoints(own_etcd.endpoint)))
    try:
        e.put("/conn/a", b"1")
        assert connections_to(own_etcd.client_port) == 1
        deliveries: queue.SimpleQueue = queue.SimpleQueue()
        watch = WatchStream(e, lambda *delivery: deliveries.put(delivery), name="conn-watch").start()
        watch.add("conn", "/conn/", b"/conn0", 1)
        assert deliveries.get(timeout=WAIT)[2][0].key == "/conn/a"
        stream = KeepAliveStream(e, e.lease_grant(10))
        assert stream.ping(timeout=WAIT)[0] > 0  # a second stream on the same member: no third connection
        assert connections_to(own_etcd.client_port) == 2
        stream.close()
        watch.cancel()
    finally:
        e.close()


def test_a_closed_client_ends_its_streams_and_the_loop_stays(own_etcd):
    """Closing a client closes its aio channels; a watch on it resumes on the client's next channel, and the
    process's loop serves the next client as before."""
    e = Etcd(EtcdConfig(parse_endpoints(own_etcd.endpoint)))
    deliveries: queue.SimpleQueue = queue.SimpleQueue()
    watch = WatchStream(e, lambda *delivery: deliveries.put(delivery), name="closed-watch").start()
    rev = e.put("/closed/a", b"1")
    watch.add("closed", "/closed/", b"/closed0", rev)
    assert deliveries.get(timeout=WAIT)[2][0].key == "/closed/a"
    e.close()  # its streams end CANCELLED; the watch resumes on a new channel from its next revision
    e.put("/closed/b", b"2")
    assert [ev.key for ev in deliveries.get(timeout=WAIT)[2]] == ["/closed/b"]
    assert watch.resumes >= 1
    watch.cancel()
    e.close()
    loop = LOOP.loop()
    assert LOOP.loop() is loop and loop.is_running()


def test_callbacks_handed_over_while_a_wake_is_due_ride_on_it_in_order(monkeypatch):
    """While the loop is busy, 200 callbacks handed over from 4 threads cost one wake-up of the loop (one
    ``call_soon_threadsafe``), not 200, and each thread's run in the order it handed them over; a callback that
    raises drops none of the others."""
    loop = LOOP.loop()
    busy, release = threading.Event(), threading.Event()
    LOOP.call_soon(lambda: (busy.set(), release.wait(WAIT)))
    assert busy.wait(WAIT)
    wakes = []
    real = loop.call_soon_threadsafe
    monkeypatch.setattr(loop, "call_soon_threadsafe", lambda *a: (wakes.append(a[0]), real(*a))[1])
    ran: list[tuple[int, int]] = []

    def hand(k: int) -> None:
        for i in range(50):
            LOOP.call_soon(ran.append, (k, i))
            if i == 10:
                LOOP.call_soon(lambda: 1 / 0)  # logged, the rest still run
    threads = [threading.Thread(target=hand, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    release.set()
    LOOP.barrier(WAIT)
    monkeypatch.undo()
    assert len(wakes) == 1, wakes
    assert len(ran) == 200
    for k in range(4):
        assert [i for kk, i in ran if kk == k] == list(range(50))


def test_requests_written_in_a_burst_all_go_out_in_order(own_etcd):
    """A burst of keepalive requests written at once on one stream (no wait between writes): gRPC takes one send at
    a time, and every request is sent and answered, in order (20 answers for 20 requests)."""
    e = Etcd(EtcdConfig(parse_endpoints(own_etcd.endpoint)))
    try:
        stream = KeepAliveStream(e, e.lease_grant(10))
        assert stream.ping(timeout=WAIT)[0] > 0
        line = stream._line
        for _ in range(20):
            line.send()
        answers = [stream._answers.get(timeout=WAIT) for _ in range(20)]
        assert all(source is line and answer.TTL > 0 for source, answer in answers)
        stream.close()
    finally:
        e.close()


def test_a_send_waiting_on_a_call_that_ended_is_cancelled_not_left_pending():
    """A request handed to gRPC on a call whose connection dropped may never be taken: when the call's answers end,
    the send is cancelled, so no task is left pending (asyncio says "Task was destroyed but it is pending" at exit)."""
    calls, ended = [], queue.SimpleQueue()

    class Call:  # a stream-stream call whose sends never complete
        def __init__(self):
            self.answer = asyncio.get_running_loop().create_future()
            self.sent = asyncio.get_running_loop().create_future()

        async def read(self):
            return await self.answer

        async def write(self, request):
            await self.sent

        def cancel(self):
            pass

    stream = Stream(lambda: calls.append(Call()) or calls[-1], {}, lambda answer: None, ended.put)
    stream.write("a request")
    LOOP.barrier(WAIT)
    assert stream._sender is not None and not stream._sender.done()
    LOOP.call_soon(calls[0].answer.set_exception, ConnectionResetError("the connection dropped"))
    assert isinstance(ended.get(timeout=WAIT), ConnectionResetError)
    LOOP.barrier(WAIT)
    assert stream._sender.cancelled()
