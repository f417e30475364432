"""The steady load of idle agents (issue 26): what they cost etcd while nothing happens, counted from etcd's
/metrics, and the liveness rules (``etcd_agent/etcd/liveness.py``) that keep it low without losing sight of a dead
watch stream. Counts only; no time is asserted."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agents import poll_until
from etcd_agent.config import EtcdConfig, Timings
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.etcd.client import Etcd
from etcd_agent.etcd.liveness import PROBER, Pulse
from etcd_agent.etcd.session import Session
from etcd_agent.etcd.watch import Watch
from etcd_agent.testing import metrics
from etcd_agent.testing.sim import JobParams, SimJob

WAIT = 60.0


def received(client_url: str) -> dict[str, float]:
    """etcd's requests so far by gRPC method: one per unary call, one per stream message."""
    out: dict[str, float] = {}
    for name, labels, value in metrics.read(client_url):
        if name == "grpc_server_msg_received_total":
            out[labels["grpc_method"]] = out.get(labels["grpc_method"], 0.0) + value
    return out


class Clock:
    """When the pulse's member was last heard from, set by hand."""

    heard = 0.0


def pulse_at(seen: float, clock: Clock, interval: float = 1.0) -> Pulse:
    pulse = Pulse(interval, lambda: clock.heard, lambda: None, lambda: None)
    pulse.seen = seen
    return pulse


def test_a_stream_whose_member_answers_is_probed_only_when_idle_long():
    clock = Clock()
    pulse = pulse_at(100.0, clock)
    clock.heard = 105.0  # a keepalive answered on the same channel
    assert pulse.due(105.5) == ("", 107.0)  # quiet: 2 intervals after the member's last answer
    clock.heard = 109.0
    assert pulse.due(109.5) == ("", 110.0)  # idle: 10 intervals after the stream's own last response
    assert pulse.due(110.0)[0] == "probe"


def test_a_silent_member_gets_its_streams_probed_and_an_unanswered_probe_is_a_dead_stream():
    clock = Clock()
    clock.heard = 100.0
    pulse = pulse_at(99.0, clock)
    assert pulse.due(102.0)[0] == "probe"  # neither the stream nor its member said anything for 2 intervals
    pulse.probed = 102.0
    assert pulse.due(103.0) == ("", 104.0)  # the probe has 2 intervals
    pulse.seen = 102.01  # anything on the stream answers it
    assert pulse.due(103.0)[0] == ""
    pulse.probed = 105.0
    assert pulse.due(107.0)[0] == "dead"


def test_a_stream_that_wants_progress_answers_is_probed_every_silent_interval():
    clock = Clock()
    clock.heard = 100.5  # ignored: the exporter and the replay want the answers themselves
    pulse = Pulse(1.0, lambda: clock.heard, lambda: None, lambda: None, eager=True)
    pulse.seen = 100.0
    assert pulse.due(101.0)[0] == "probe"
    pulse.probed = 101.0
    assert pulse.due(103.0)[0] == "dead"  # 3 silent intervals, as before


def test_the_prober_probes_a_silent_stream_then_ends_it_when_nothing_answers():
    probed, dead = threading.Event(), threading.Event()
    pulse = Pulse(0.05, lambda: 0.0, probed.set, dead.set)
    PROBER.add(pulse)
    try:
        assert probed.wait(WAIT) and dead.wait(WAIT)
        assert pulse.verdict == "dead"
    finally:
        PROBER.remove(pulse)


def test_a_member_marked_failed_is_no_longer_counted_as_heard():
    e = Etcd(EtcdConfig(parse_endpoints("127.0.0.1:1,127.0.0.1:2")))
    e.heard("127.0.0.1:1", 5.0)
    assert e.last_heard("127.0.0.1:1") == 5.0
    e.mark_failed("127.0.0.1:1")
    assert e.last_heard("127.0.0.1:1") == 0.0


@pytest.mark.parametrize("names", [1, 2])
def test_idle_agents_send_etcd_at_most_one_request_per_second(names, own_etcd, run_id):
    """Three idle agents at the default lease TTL (5 s) over four TTLs: their keepalives and their watch probes (only
    when a stream's member fell silent, or every 10 probe intervals) stay within one request per agent per second,
    where a keepalive every TTL/3 plus a progress request every second (1.6) did not. With the one etcd under two
    names the session follows the several-members rule (``Timings.keepalive``): a keepalive every TTL/4 at TTL 5,
    0.9 requests per second with the probes (at most 17 + 3 in the window), where every TTL/6 (1.3: 24) did not."""
    nodes = ["idle-0", "idle-1", "idle-2"]
    ttl = Timings().lease_ttl
    window = 4 * ttl
    port = own_etcd.endpoint.rsplit(":", 1)[1]
    endpoint = own_etcd.endpoint if names == 1 else f"{own_etcd.endpoint},localhost:{port}"
    with SimJob(JobParams(endpoint, run_id, min_nodes=3, max_nodes=3, lease_ttl=ttl)) as job:
        job.start(nodes)
        job.wait_round(1, nodes, timeout=WAIT)
        threading.Event().wait(ttl)  # a pause, not a synchronization: round 1's last answers drain
        before = received(own_etcd.client_url)
        threading.Event().wait(window)  # the idle window whose requests are counted
        after = received(own_etcd.client_url)
        assert not job.hub.done and set(job.hub.starts) == {1}, "an agent ended or its round was re-formed"
    sent = {m: after.get(m, 0.0) - before.get(m, 0.0) for m in after}
    per_agent = sum(sent.values()) / len(nodes)
    assert per_agent <= window, f"{per_agent:.1f} requests per agent in {window} s: {sent}"
    # the watches: a probe every 10 probe intervals (10 s at TTL 5), not one per second
    assert sent.get("Watch", 0.0) / len(nodes) <= window / 5, sent


@pytest.mark.chaos  # etcd is frozen
def test_a_watch_beside_a_session_still_notices_a_frozen_member(own_etcd):
    """With a session on the same client the watch is not probed while keepalives are answered; once the member
    freezes it is heard no more, and the watch resumes (counted, not timed)."""
    e = Etcd(EtcdConfig(parse_endpoints(own_etcd.endpoint)))
    lost: list[str] = []
    session = Session(e, Timings(5), lost.append).start()
    rev = e.put("/f/a", b"1")
    deliveries: queue.Queue = queue.Queue()
    w = Watch(e, "/f/", rev + 1, deliveries.put, probe_interval=Timings(5).watch_probe).start()
    poll_until(lambda: session.renewed > 0 and e.last_heard(e.endpoint_label()) > 0, 60, "no answer heard")
    own_etcd.freeze()
    try:
        poll_until(lambda: w.resumes, 30, "a frozen etcd was not noticed by the watch")
    finally:
        own_etcd.thaw()
    e.put("/f/b", b"2", deadline=10)
    got = deliveries.get(timeout=60)
    assert [ev.key for ev in got] == ["/f/b"]
    w.cancel()
    session.close(revoke=False)
    e.close()


def test_an_idle_watch_stream_costs_one_thread_and_nothing_wakes(own_etcd):
    """A watch stream's gRPC call runs on the process's one stream loop (``etcd.streams_loop``, grpc.aio): the stream
    adds one thread, its consumer, and no reader or request thread of gRPC's. While it is idle its consumer, the
    loop and gRPC's completion-queue poller sleep: counted from /proc over a 2 s pause (about 30 wake-ups with the
    blocking API's 0.1 s and 200 ms slices), not timed. Measured in a process of its own
    (``idle_stream_probe.py``): the loop and the poller serve every stream of a process, and a test process that
    other tests used may hold their clients' streams too."""
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("idle_stream_probe.py")), own_etcd.endpoint],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["delivered"] == ["/idle/a"]  # the stream is up and delivers
    assert got["added"] == ["idle-watch"], got["added"]
    assert len(got["serving"]) == 3, got["serving"]
    woke = got["woke"]
    assert sum(woke.values()) <= 6, f"the idle stream's threads woke in 2 s: {woke}"
