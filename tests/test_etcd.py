"""The etcd layer against real etcd processes: watch resume, compaction, silent streams, sessions, errors."""

from __future__ import annotations

import queue
import subprocess
import sys
import time

import pytest

from agents import poll_until
from containers import member_class
from etcd_agent.config import EtcdConfig, Timings
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.errors import EtcdUnavailable
from etcd_agent.etcd.client import Etcd, absent, mod_is, none_under, op_get, op_put
from etcd_agent.etcd.session import Session
from etcd_agent.proctree import free_port
from etcd_agent.etcd.watch import Resync, Watch


def client(endpoint: str, **kw) -> Etcd:
    return Etcd(EtcdConfig(parse_endpoints(endpoint), **kw))


def collect(q: queue.Queue, count: int, timeout: float = 15.0) -> list:
    """Take watch events until ``count`` arrived (Resyncs are returned as they come)."""
    got, deadline = [], time.monotonic() + timeout
    while len([g for g in got if not isinstance(g, Resync)]) < count:
        item = q.get(timeout=max(0.01, deadline - time.monotonic()))
        got.extend(item if isinstance(item, list) else [item])
    return got


def test_guarded_txn_compare_semantics(etcd_endpoint, run_id):
    e = client(etcd_endpoint)
    p = f"/t/{run_id}/"
    first = e.txn([absent(p + "a")], [op_put(p + "a", b"1")])
    assert first.succeeded
    again = e.txn([absent(p + "a")], [op_put(p + "a", b"2")], [op_get(p + "a")])
    assert not again.succeeded and again.ranges[0][0].value == b"1"
    kv, _ = e.get(p + "a")
    assert e.txn([mod_is(p + "a", kv.mod_revision)], [op_put(p + "a", b"3")]).succeeded
    assert not e.txn([mod_is(p + "a", kv.mod_revision)], [op_put(p + "a", b"4")]).succeeded
    assert e.txn([none_under(p + "empty/")], [op_put(p + "b", b"1")]).succeeded
    e.put(p + "empty/x", b"1")
    assert not e.txn([none_under(p + "empty/")], [op_put(p + "b", b"2")]).succeeded
    e.close()


@pytest.mark.chaos  # etcd restarts
def test_watch_survives_an_etcd_restart_without_losing_events(own_etcd):
    e, writer = client(own_etcd.endpoint), client(own_etcd.endpoint)
    rev = e.put("/w/start", b"0")
    q: queue.Queue = queue.Queue()
    w = Watch(e, "/w/", rev + 1, q.put, probe_interval=0.3).start()
    writer.put("/w/a", b"1")
    assert [ev.key for ev in collect(q, 1)] == ["/w/a"]
    own_etcd.restart()
    for i in range(5):  # written while the watch is reconnecting
        writer.put(f"/w/b{i}", b"x", deadline=15)
    events = collect(q, 5)
    assert [ev.key for ev in events] == [f"/w/b{i}" for i in range(5)]
    assert w.resumes >= 1
    w.cancel()
    e.close()
    writer.close()


def test_watch_resyncs_after_compaction(own_etcd):
    e = client(own_etcd.endpoint)
    rev = e.put("/c/a", b"1")
    for i in range(3):
        e.put(f"/c/k{i}", b"x")
    last = e.put("/c/z", b"z")
    e.compact(last)
    q: queue.Queue = queue.Queue()
    w = Watch(e, "/c/", rev + 1, q.put, probe_interval=0.3).start()
    item = q.get(timeout=60)
    assert isinstance(item, Resync)
    assert {kv.key for kv in item.kvs} == {"/c/a", "/c/k0", "/c/k1", "/c/k2", "/c/z"}
    e.put("/c/after", b"1")
    assert [ev.key for ev in collect(q, 1)] == ["/c/after"]
    w.cancel()
    e.close()


@pytest.mark.chaos  # etcd is frozen
def test_a_silent_watch_stream_is_detected(own_etcd):
    e = client(own_etcd.endpoint)
    rev = e.put("/s/a", b"1")
    q: queue.Queue = queue.Queue()
    w = Watch(e, "/s/", rev + 1, q.put, probe_interval=0.2).start()
    own_etcd.freeze()
    started = time.monotonic()
    try:
        poll_until(lambda: w.resumes, 30, "a frozen etcd was not noticed")  # the watch's thread counts it
        detected = time.monotonic() - started
    finally:
        own_etcd.thaw()
    print(f"silent stream detected after {detected:.2f} s (at most 4 probe intervals after its last answer: 0.8 s)")
    e.put("/s/b", b"2", deadline=10)
    assert [ev.key for ev in collect(q, 1)] == ["/s/b"]
    w.cancel()
    e.close()


def test_session_keeps_its_lease_and_revokes_it(own_etcd):
    """The key outlives the lease's first TTL: a keepalive sent after the grant plus the TTL was answered (the
    session's own record of it), so only keepalives kept it. The default TTL (5 s) leaves a loaded machine's etcd
    the default slack: at TTL 2 an answer later than 0.2 s already counted as a failed keepalive."""
    e = client(own_etcd.endpoint)
    s = Session(e, Timings(5)).start()
    granted = s.renewed
    e.put("/l/k", b"1", lease=s.lease_id)
    poll_until(lambda: s.renewed > granted + s.ttl or s.lost.is_set(), 60, "a keepalive past the first TTL")
    assert not s.lost.is_set() and e.get("/l/k")[0] is not None
    s.close(revoke=True)
    assert e.get("/l/k")[0] is None
    e.close()


@pytest.mark.chaos  # etcd is frozen
def test_session_is_lost_before_the_lease_can_expire(own_etcd):
    """etcd freezes: the keepalives go unanswered and the session declares itself lost while etcd still holds the
    lease, as etcd itself reports it when it is thawed at that moment (LeaseTimeToLive: the whole seconds left, -1
    once gone). At TTL 8 the session gives up 2 s (the fencing margin) before the lease can expire."""
    e = client(own_etcd.endpoint, request_timeout=0.5)
    reasons: queue.SimpleQueue[str] = queue.SimpleQueue()

    def lost(why: str) -> None:  # on the keepalive thread, just after ``lost`` is set
        own_etcd.thaw()
        reasons.put(why)

    s = Session(e, Timings(8), on_lost=lost).start()
    own_etcd.freeze()
    try:
        why = reasons.get(timeout=60)
        left = e.lease_ttl(s.lease_id)
    finally:
        own_etcd.thaw()
    assert s.lost.is_set() and "keepalive" in why, why
    assert left >= 1, f"etcd had {left} s left of the lease when the session was lost: not before it could expire"
    s.close(revoke=True)
    e.close()


def test_unreachable_etcd_is_our_error_naming_the_endpoint():
    endpoint = f"127.0.0.1:{free_port()}"
    e = client(endpoint, connect_timeout=0.5)
    with pytest.raises(EtcdUnavailable, match=endpoint):
        e.get("/x")
    e.close()


@pytest.mark.chaos  # etcd restarts under the stream
def test_one_stream_carries_several_ranges_that_come_and_go(own_etcd):
    """WatchStream: ranges added and removed on the open stream, each resumed after an etcd restart, a removed
    range never delivers again, and a compacted range is re-read while the others go on."""
    from etcd_agent.etcd.watch import WatchStream

    e, writer = client(own_etcd.endpoint), client(own_etcd.endpoint)
    rev = e.put("/m/start", b"0")
    q: queue.Queue = queue.Queue()
    stream = WatchStream(e, lambda name, token, d: q.put((name, token, d)), probe_interval=0.3).start()

    def take(count: int, timeout: float = 15.0) -> list[tuple[str, str]]:
        got, deadline = [], time.monotonic() + timeout
        while len(got) < count:
            name, _token, d = q.get(timeout=max(0.01, deadline - time.monotonic()))
            got.extend((name, "resync") if isinstance(d, Resync) else (name, ev.key) for ev in
                       ([d] if isinstance(d, Resync) else d))
        return got

    a = stream.add("a", "/m/a/", b"/m/a0", rev + 1)
    stream.add("one", "/m/key", b"", rev + 1)  # a single key: /m/key2 is not it
    writer.put("/m/a/1", b"x")
    writer.put("/m/key2", b"x")
    writer.put("/m/key", b"x")
    assert sorted(take(2)) == [("a", "/m/a/1"), ("one", "/m/key")]
    stream.remove("one")
    b = stream.add("a", "/m/b/", b"/m/b0", writer.put("/m/b/0", b"x"))  # replaces "a": a new token
    assert b != a
    writer.put("/m/a/2", b"x")  # no longer watched
    last = writer.put("/m/b/1", b"x")
    writer.put("/m/key", b"y")
    assert take(2) == [("a", "/m/b/0"), ("a", "/m/b/1")]

    own_etcd.restart()
    for i in range(3):  # written while the stream is reconnecting
        writer.put(f"/m/b/r{i}", b"x", deadline=15)
    assert take(3) == [("a", f"/m/b/r{i}") for i in range(3)]
    assert stream.resumes >= 1

    e.compact(writer.put("/m/b/c", b"x"))  # the stream already has /m/b/c or gets it; then a stale add
    take(1)
    stream.add("old", "/m/a/", b"/m/a0", last)  # a revision compacted away: re-read, then watched on
    got = take(1)
    assert got == [("old", "resync")]
    writer.put("/m/a/3", b"x")
    assert take(1) == [("old", "/m/a/3")]
    assert q.empty()
    stream.cancel()
    e.close()
    writer.close()


@pytest.mark.chaos  # etcd restarts
def test_a_session_keeps_its_lease_alive_over_one_stream_and_reopens_it_after_a_restart(own_etcd):
    from etcd_agent.testing import metrics

    def streams_and_requests() -> tuple[float, float]:
        return tuple(metrics.total(own_etcd.client_url, name, grpc_method="LeaseKeepAlive")
                     for name in ("grpc_server_started_total", "grpc_server_msg_received_total"))

    e = client(own_etcd.endpoint, request_timeout=0.5)
    s = Session(e, Timings(5)).start()  # a keepalive every 1.7 s; the default TTL's slack on a loaded machine
    poll_until(lambda: streams_and_requests()[1] >= 3, 60, "fewer than 3 keepalives")
    assert streams_and_requests()[0] == 1  # all of them on one stream
    own_etcd.restart()
    # the counters start again with the restarted etcd: keepalives arrive again, on a reopened stream
    poll_until(lambda: streams_and_requests()[1] >= 2, 60, "no keepalives after the restart")
    assert not s.lost.is_set()
    assert e.lease_ttl(s.lease_id) > 0
    s.close(revoke=True)
    e.close()


def test_a_bare_host_port_against_a_tls_etcd_says_so_at_once(pki, tmp_path):
    """A plaintext client meets a TLS etcd as "Socket closed"; instead of retrying that for --etcd-timeout (600 s
    here, longer than the test may run), the first attempt says in one line that the server speaks TLS and what to
    give."""
    from tls import HAVE_OPENSSL, TlsEtcd

    if not HAVE_OPENSSL:
        pytest.skip("openssl is needed to make the certificates")
    server = member_class(TlsEtcd)(pki, name="tls-bare").start()
    try:
        got = subprocess.run([sys.executable, "-m", "etcd_agent", "--etcd-endpoints", server.endpoint, "--run-id",
                              "tls-bare", "--etcd-timeout", "600", "--log-dir", str(tmp_path), "/bin/true"],
                             capture_output=True, text=True, timeout=90)
    finally:
        server.stop()
    assert got.returncode == 2, got.stderr
    errors = [line for line in got.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, got.stderr
    assert f"--etcd-endpoints {server.endpoint}: etcd at {server.endpoint} speaks TLS" in errors[0]
    assert f"give https://{server.endpoint}" in errors[0] and "--etcd-cacert" in errors[0]


def test_a_retried_call_says_so_at_debug_and_once_at_info_when_slow(caplog):
    """Each retry is a DEBUG line naming the call and the error; the first past ``retry.SLOW`` seconds one INFO."""
    import logging

    import tenacity

    from etcd_agent.etcd import retry

    say = retry.retry_policy(10.0, None, where="get /k").before_sleep

    def state(attempt: int, took: float) -> tenacity.RetryCallState:
        s = tenacity.RetryCallState(None, None, (), {})
        s.attempt_number, s.start_time, s.outcome_timestamp = attempt, 0.0, took
        s.outcome = tenacity.Future(attempt)
        s.outcome.set_exception(EtcdUnavailable("etcd get /k failed: UNAVAILABLE: connection refused"))
        s.next_action = tenacity.RetryAction(0.1)
        return s

    with caplog.at_level(logging.DEBUG, logger="etcd_agent.etcd.retry"):
        for attempt, took in [(1, 0.1), (2, 0.5), (3, 1.2), (4, 1.8), (5, 2.5)]:
            say(state(attempt, took))
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    debugs = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(infos) == 1 and infos[0].startswith("etcd get /k failed: UNAVAILABLE: connection refused; still "
                                                   "retrying after 1.2 s (try 3;")
    assert len(debugs) == 4 and all(line.startswith("etcd get /k failed: UNAVAILABLE") and "retrying in" in line
                                    for line in debugs)


def test_a_call_is_tried_once_without_tenacity_and_retried_under_it_only_when_it_fails(caplog):
    """``retry.retrying``: a call that succeeds is tried once; one that fails goes on under the policy from that
    failure (its backoff and its DEBUG line for that try); EtcdNoSpace is never retried; past the deadline the
    first error is the answer. Counts only."""
    import logging

    from etcd_agent.errors import EtcdNoSpace
    from etcd_agent.etcd.retry import retrying

    def flaky(fails: int, error=EtcdUnavailable):
        tries = []

        def call():
            tries.append(1)
            if len(tries) <= fails:
                raise error(f"etcd get /k failed: try {len(tries)}")
            return len(tries)
        return call, tries

    call, tries = flaky(0)
    assert retrying(call, time.monotonic() + 10, None, where="get /k") == 1 and len(tries) == 1
    call, tries = flaky(2)
    with caplog.at_level(logging.DEBUG, logger="etcd_agent.etcd.retry"):
        assert retrying(call, time.monotonic() + 10, None, where="get /k") == 3 and len(tries) == 3
    said = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert [line.split(";")[0] for line in said] == ["etcd get /k failed: try 1", "etcd get /k failed: try 2"]
    call, tries = flaky(1, EtcdNoSpace)
    with pytest.raises(EtcdNoSpace):
        retrying(call, time.monotonic() + 10, None, where="put /k")
    assert len(tries) == 1
    call, tries = flaky(5)
    with pytest.raises(EtcdUnavailable, match="try 1"):
        retrying(call, time.monotonic() - 1, None, where="get /k")
    assert len(tries) == 1
