"""Sessions of the coordination layer, driven in-process against the real etcd: a session that fails half-way is
never left behind (keepalive thread or lease), and a retried registration whose first attempt applied never meets
its own ghost as a duplicate node."""

from __future__ import annotations

import queue
import threading
import time

import pytest
from agents import JOB

from etcd_agent.coord import coordinator as coordinator_mod
from etcd_agent.coord import txns
from etcd_agent.config import AgentConfig, EtcdConfig, JobSpec, WorkerConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.coord.coordinator import Coordinator
from etcd_agent.errors import DuplicateNode, EtcdUnavailable


def make_agent(endpoint: str, run_id: str, node: str = "node-a", joined: bool = True) -> Coordinator:
    """A coordinator; ``joined``: its job's keys found already (else ``open`` finds them)."""
    cfg = AgentConfig(run_id=run_id, node_id=node, spec=JobSpec(1, 2, "1", 0), workers=WorkerConfig(JOB, (), 1),
                      etcd=EtcdConfig(parse_endpoints(endpoint), request_timeout=1.0), lease_ttl=3)
    c = Coordinator(cfg, "test", queue.SimpleQueue().put, threading.Event())
    if joined:
        c.keys = txns.init_job(c.etcd, c.run_keys, cfg.spec, time.time())
    return c


def unanswered(client, kwargs):
    """An etcd call that gets no answer."""
    raise EtcdUnavailable("no answer")


def lease_alive(c: Coordinator, lease: int) -> bool:
    return c.etcd.lease_ttl(lease) > 0


def ignore(session, why) -> None:
    pass


@pytest.fixture
def agents_made():
    made: list[Coordinator] = []
    yield made
    for a in made:
        if a.session is not None:
            a.session.close(revoke=True)
        a.etcd.close()


def test_a_retried_registration_never_meets_its_own_ghost(etcd_endpoint, run_id, monkeypatch, agents_made):
    a = make_agent(etcd_endpoint, run_id)
    agents_made.append(a)
    real = txns.register
    calls = []

    def applied_then_lost(*args, **kwargs):
        res = real(*args, **kwargs)  # the registration applies ...
        calls.append(args[-1])
        if len(calls) == 1:
            raise EtcdUnavailable("the response was lost")  # ... and the agent never hears of it
        return res

    monkeypatch.setattr(coordinator_mod.txns, "register", applied_then_lost)
    stale: list[int] = []
    with pytest.raises(EtcdUnavailable):
        a.new_session(ignore, stale)
    first = calls[0]
    assert stale == [first]
    assert not a.session._thread.is_alive(), "the failed session's keepalive thread still runs"
    assert a.etcd.get(a.keys.node("node-a"))[0].lease == first  # its ghost is registered
    a.new_session(ignore, stale)  # no DuplicateNode: the ghost's lease goes first
    kv, _ = a.etcd.get(a.keys.node("node-a"))
    assert kv.lease == a.session.lease_id != first and stale == []
    assert not lease_alive(a, first)


def test_a_refused_session_leaves_no_lease_and_no_thread(etcd_endpoint, run_id, agents_made):
    holder = make_agent(etcd_endpoint, run_id)
    agents_made.append(holder)
    holder.new_session(ignore)
    other = make_agent(etcd_endpoint, run_id)  # the same node id, a live holder: refused
    agents_made.append(other)
    with pytest.raises(DuplicateNode):
        other.new_session(ignore)
    assert not other.session._thread.is_alive()
    assert not lease_alive(other, other.session.lease_id)
    assert lease_alive(holder, holder.session.lease_id)


def starved_keepalive(a: Coordinator) -> None:
    """The keepalive thread's deadline passed while the registration was retried: the session is lost."""
    a.session.lost.set()
    a.etcd.call("register", unanswered, deadline=30)


def expired_lease(a: Coordinator) -> None:
    """The lease expired between its grant and the registration: etcd answers "lease not found" (SessionLost)."""
    a.etcd.lease_revoke(a.session.lease_id)


@pytest.mark.parametrize("fault", [starved_keepalive, expired_lease], ids=["keepalive-starved", "lease-expired"])
def test_a_first_session_lost_while_it_registers_is_replaced_not_an_error(etcd_endpoint, run_id, monkeypatch,
                                                                          agents_made, fault):
    """A loaded machine can starve the first session's keepalives while its registration retries, or let its lease
    expire before the registration (found by 2000 simulated agents on 2 cores, where it ended the agent): etcd
    answered, so this is no unreachable etcd (a ConfigError) but a lost session; ``open`` opens another, the lost
    one's lease revoked first, and registers with it."""
    a = make_agent(etcd_endpoint, run_id, joined=False)
    agents_made.append(a)
    real = txns.register
    leases = []

    def lost_the_first_time(*args, **kwargs):
        leases.append(a.session.lease_id)
        if len(leases) == 1:
            fault(a)
        return real(*args, **kwargs)

    monkeypatch.setattr(coordinator_mod.txns, "register", lost_the_first_time)
    a.open(ignore)
    assert len(leases) == 2 and leases[0] != leases[1] == a.session.lease_id
    kv, _ = a.etcd.get(a.keys.node("node-a"))
    assert kv.lease == a.session.lease_id
    assert not lease_alive(a, leases[0]), "the lost session's lease was not revoked"


def test_a_call_given_up_for_a_lost_session_says_so(etcd_endpoint, run_id, agents_made):
    a = make_agent(etcd_endpoint, run_id)
    agents_made.append(a)
    a.etcd.interrupt = lambda: True
    with pytest.raises(EtcdUnavailable, match="before its session was lost: .*no answer"):
        a.etcd.call("get", unanswered, deadline=30)


def test_an_arriving_agent_opens_with_three_calls_and_reads_nothing_once_registered(etcd_endpoint, run_id,
                                                                                    agents_made):
    """An agent arriving at a running job: one txn for the nested-run check, the job pointer, the job-wide keys, the
    registry's oldest entries and its cluster quarantine record; a lease grant; its registration. The job-wide keys
    and the cluster record are watched from that first read's revision + 1 (nothing is missed: etcd replays what
    changed since), so once the session exists no read is made that a lost session could meet."""
    first = make_agent(etcd_endpoint, run_id, joined=False)
    agents_made.append(first)
    first.open(ignore)
    a = make_agent(etcd_endpoint, run_id, node="node-b", joined=False)
    agents_made.append(a)
    real, calls = a.etcd.call, []

    def counted(where, *args, **kwargs):
        calls.append(where)
        return real(where, *args, **kwargs)
    a.etcd.call = counted
    a.open(ignore)
    assert [where.split(" ")[0] for where in calls] == ["check", "lease", "register"], calls
    read = a.watches.known["control"]
    kv = a.mirror.get(a.keys.node("node-b"))  # the registration as its txn read it back
    assert read < kv.mod_revision, "the job-wide keys are read before the registration, in the first txn"
    assert a.mirror.get(a.keys.spec()) is not None and a.mirror.get(a.keys.round()) is not None
    a.quarantine.holds(a.cfg.quarantine, time.time())  # the gate's first use: watched from the first read on
    assert a.watches.known["cluster_quarantine"] == read and len(calls) == 3, calls
