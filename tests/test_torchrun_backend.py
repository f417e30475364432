"""torchrun's ``etcd-v3`` rendezvous handler in one process against the real etcd: torch's registry finds it,
``--rdzv-conf`` is checked, and the handler keeps torch's ``RendezvousHandler`` contract (rounds, re-rendezvous
after a failure, ``num_nodes_waiting`` from the watch, scale-up, closing, shutdown, fencing)."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading

import pytest

pytest.importorskip("torch")
from torch.distributed.elastic.rendezvous import (RendezvousClosedError, RendezvousConnectionError,  # noqa: E402
                                                  RendezvousParameters, RendezvousTimeoutError)
from torch.distributed import DistStoreError  # noqa: E402
from torch.distributed.elastic.utils import store as store_util  # noqa: E402

from agents import job_keys, keys_of, poll_until  # noqa: E402
from etcd_agent.torch.store import EtcdStore  # noqa: E402
from etcd_agent.config import EtcdConfig  # noqa: E402
from etcd_agent.endpoints import parse_endpoints  # noqa: E402
from etcd_agent.etcd.client import Etcd  # noqa: E402
from etcd_agent.schema.keys import prefix_end  # noqa: E402
from etcd_agent.torch.rendezvous import BACKEND, EtcdV3RendezvousHandler, create_handler  # noqa: E402

pytestmark = pytest.mark.torch


def params(endpoint: str, run_id: str, nnodes=(2, 2), **conf) -> RendezvousParameters:
    conf = {"timeout": 900, "last_call_timeout": "1", **conf}  # torchrun always passes timeout
    return RendezvousParameters(BACKEND, endpoint, run_id, nnodes[0], nnodes[1], local_addr="127.0.0.1", **conf)


@pytest.fixture
def handlers():
    made: list[EtcdV3RendezvousHandler] = []
    yield made
    for h in made:
        h.shutdown()


def make(handlers, endpoint, run_id, node, nnodes=(2, 2), **kw) -> EtcdV3RendezvousHandler:
    h = create_handler(params(endpoint, run_id, nnodes, node_id=node, **kw))
    handlers.append(h)
    return h


def background(fn) -> concurrent.futures.Future:
    """``fn()`` on a daemon thread: a test that fails while it still blocks does not hang on it."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001
            future.set_exception(exc)
    threading.Thread(target=run, daemon=True).start()
    return future


def rendezvous(*hs, timeout=30.0):
    futures = [background(h.next_rendezvous) for h in hs]
    return [f.result(timeout=timeout) for f in futures]


def test_torch_registry_finds_the_backend(etcd_endpoint, run_id):
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    h = get_rendezvous_handler(params(etcd_endpoint, run_id))
    try:
        assert isinstance(h, EtcdV3RendezvousHandler)
        assert h.get_backend() == "etcd-v3" and h.get_run_id() == run_id and h.use_agent_store is False
    finally:
        h.shutdown()


@pytest.mark.parametrize("conf, message", [
    ({"bogus": "1"}, r"--rdzv-conf bogus: not a key the etcd-v3 backend knows \(known: .*join_timeout"),
    ({"join_timeout": "soon"}, r"--rdzv-conf join_timeout=soon: expected a number of seconds"),
    ({"lease_ttl": "-1"}, r"--rdzv-conf lease_ttl=-1: expected a whole number"),
    ({"lease_ttl": "1"}, r"--lease-ttl must be at least 2"),
    ({"etcd_password": "hunter2"}, r"etcd_password: a password on the command line .* \$ETCD_AGENT_ETCD_PASSWORD"),
    ({"etcd_cacert": "/no/such/ca.pem"}, r"--rdzv-conf etcd_cacert=/no/such/ca.pem: no such file"),
    ({"protocol": "https"}, r"protocol=https needs etcd_cacert"),
    ({"protocol": "ftp"}, r"protocol=ftp: expected http or https"),
    ({"last_call": "1", "last_call_timeout": "2"}, r"given twice"),
    ({"etcd_user": "root"}, r"--etcd-user needs TLS"),
])
def test_bad_rdzv_conf_is_a_clear_error(etcd_endpoint, run_id, conf, message):
    with pytest.raises(ValueError, match=message):
        create_handler(params(etcd_endpoint, run_id, **conf))


def test_missing_endpoint_and_bad_run_id(etcd_endpoint):
    with pytest.raises(ValueError, match="--rdzv-endpoint: the etcd-v3 backend needs the etcd endpoints"):
        create_handler(params("", "job"))
    with pytest.raises(ValueError, match="--run-id 'a b'"):
        create_handler(params(etcd_endpoint, "a b"))


def test_torch_keys_of_other_backends_are_accepted(etcd_endpoint, run_id):
    h = create_handler(params(etcd_endpoint, run_id, read_timeout="60", is_host="1", keep_alive_interval="2",
                              keep_alive_max_attempt="4", join_timeout="30", close_timeout="5"))
    try:
        assert h.cfg.lease_ttl == 8  # torch's heartbeat settings: dead after interval x attempts
        assert h.cfg.join_timeout == 30.0
    finally:
        h.shutdown()


def test_an_unreachable_etcd_fails_the_rendezvous_with_a_connection_error():
    h = create_handler(params("127.0.0.1:1", "job", etcd_timeout="1"))
    try:  # the budget it gave up after is its etcd_timeout, not the default's 10 s
        with pytest.raises(RendezvousConnectionError, match=r"cannot reach etcd at 127\.0\.0\.1:1 within 1\.0 s"):
            h.next_rendezvous()
    finally:
        h.shutdown()


def test_a_round_that_never_forms_is_torchs_rendezvous_timeout(handlers, etcd_endpoint, run_id):
    """The agent's RendezvousTimeout (a type, not its message) becomes torch's RendezvousTimeoutError."""
    h = make(handlers, etcd_endpoint, run_id, "node-a", join_timeout="1")
    with pytest.raises(RendezvousTimeoutError, match="rendezvous timed out: 1 of at least 2 node"):
        h.next_rendezvous()


def test_rounds_restart_and_close(handlers, etcd_endpoint, run_id):
    a, b = (make(handlers, etcd_endpoint, run_id, n) for n in ("n0", "n1"))
    first = rendezvous(a, b)
    assert sorted(i.rank for i in first) == [0, 1] and {i.world_size for i in first} == {2}
    assert len({(i.bootstrap_store_info.master_addr, i.bootstrap_store_info.master_port) for i in first}) == 1
    keys = keys_of(run_id)
    assert all(isinstance(i.store, EtcdStore) and i.store.prefix == keys.store(1) for i in first)
    first[0].store.set("hello", "world")
    assert first[1].store.get("hello") == b"world"  # one store for the round
    assert (a.num_nodes_waiting(), b.num_nodes_waiting()) == (0, 0)
    assert not a.is_closed()
    ranks = {h.cfg.node_id: i.rank for h, i in zip((a, b), first)}

    # torch's agent on n1 restarted its workers after a failure: it calls next_rendezvous again
    again = background(b.next_rendezvous)
    poll_until(lambda: a.num_nodes_waiting() > 0, 60, "n0 to see that a new round began")
    second = [a.next_rendezvous(), again.result(timeout=30)]
    assert {h.cfg.node_id: i.rank for h, i in zip((a, b), second)} == ranks  # stable ranks
    assert all(i.store.prefix == keys.store(2) for i in second)
    state = job_keys(etcd_endpoint, run_id)
    assert state[keys.restarts()]["used"] == 1
    assert state[keys.failure(1, "n1")]["node"] == "n1"
    assert a.num_nodes_waiting() == 0

    # the leader of round 2 deleted round 1's store
    etcd = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
    try:
        poll_until(lambda: not etcd.get_prefix(keys.store(1))[0], 60, "round 1's store to be deleted")
    finally:
        etcd.close()

    # n0's torch agent ends without its workers succeeding: shutdown closes the rendezvous for everyone
    assert a.shutdown()
    state = job_keys(etcd_endpoint, run_id)
    assert state[keys.result()]["outcome"] == "stopped"
    assert keys.node("n0") not in state  # its lease was revoked
    poll_until(lambda: b.is_closed() and b.num_nodes_waiting() > 0, 60, "n1 to see the rendezvous closed")
    with pytest.raises(RendezvousClosedError, match="closed the rendezvous"):
        b.next_rendezvous()


def test_exit_barrier_then_shutdown_ends_the_job_succeeded(handlers, etcd_endpoint, run_id):
    hs = [make(handlers, etcd_endpoint, run_id, n) for n in ("n0", "n1")]
    infos = rendezvous(*hs)
    # torch's agent after its workers succeeded
    done = [background(lambda i=i: store_util.barrier(i.store, 2, "torchelastic/agent/terminal_state", 30))
            for i in infos]
    for f in done:
        f.result(timeout=30)
    for h in hs:
        assert h.shutdown()
    state = job_keys(etcd_endpoint, run_id)
    keys = keys_of(run_id)
    assert state[keys.result()]["outcome"] == "succeeded"
    assert {keys.exit(1, "n0"), keys.exit(1, "n1")} <= set(state)
    with pytest.raises(RendezvousClosedError, match="succeeded"):
        hs[0].next_rendezvous()


def test_deleted_store_keys_end_the_exit_barrier_and_the_job_succeeds(handlers, etcd_endpoint, run_id):
    """A user or a cleanup deletes the round's store keys while torch's agent waits in its exit barrier (300 s, as
    torch's default): the barrier ends within seconds with an error naming a deleted key, as on torch's c10d backend
    when its store goes away; a node that reaches its barrier later ends at once too, and the job still ends
    succeeded (each node's exit is recorded when its workers succeeded)."""
    hs = [make(handlers, etcd_endpoint, run_id, n) for n in ("n0", "n1")]
    infos = rendezvous(*hs)
    first = background(lambda: store_util.barrier(infos[0].store, 2, "torchelastic/agent/terminal_state", 300))
    poll_until(lambda: infos[0].store._waiters, 30, "n0 to wait in its exit barrier")
    etcd = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
    try:
        prefix = keys_of(run_id).store(1)
        assert etcd.delete_range(prefix, prefix_end(prefix)) >= 1  # etcdctl del --prefix P/store/00000001/
    finally:
        etcd.close()
    deleted = "the store's key torchelastic/agent/terminal_state/num_members was deleted at revision"
    with pytest.raises(DistStoreError, match=deleted):
        first.result(timeout=90)  # the barrier's 300 s are past the test's timeout: it ended by the delete
    with pytest.raises(DistStoreError, match=deleted):
        store_util.barrier(infos[1].store, 2, "torchelastic/agent/terminal_state", 300)
    for h in hs:
        assert h.shutdown()
    state = job_keys(etcd_endpoint, run_id)
    assert state[keys_of(run_id).result()]["outcome"] == "succeeded"


def test_set_closed(handlers, etcd_endpoint, run_id):
    a, b = (make(handlers, etcd_endpoint, run_id, n) for n in ("n0", "n1"))
    rendezvous(a, b)
    a.set_closed()
    assert a.is_closed()
    poll_until(b.is_closed, 60, "n1 to see the rendezvous closed")
    result = job_keys(etcd_endpoint, run_id)[keys_of(run_id).result()]
    assert result["outcome"] == "stopped" and "set_closed" in result["reason"]


def test_a_closed_rendezvous_stays_closed_for_later_handlers(handlers, etcd_endpoint, run_id):
    """torch's contract: closed stays closed for the run. After ``set_closed`` a handler that comes later sees
    ``is_closed`` and gets RendezvousClosedError (it does not start a new job), as long as the closing handler
    lives: its node stays registered. After its ``shutdown`` nobody is, and the run id starts a new job."""
    a, b = (make(handlers, etcd_endpoint, run_id, n) for n in ("n0", "n1"))
    rendezvous(a, b)
    a.set_closed()
    keys = keys_of(run_id)
    poll_until(lambda: not a._thread.is_alive() and not b._thread.is_alive(), 60, "both agents to end")
    late = make(handlers, etcd_endpoint, run_id, "n2")
    assert late.is_closed()
    with pytest.raises(RendezvousClosedError, match=r"job \S+ stopped: .*closed by n0 \(set_closed\)"):
        background(late.next_rendezvous).result(timeout=30)
    assert late.is_closed()
    state = job_keys(etcd_endpoint, run_id)
    assert keys.result() in state  # still the run's current job: none was started
    assert keys.node("n1") not in state and keys.node("n0") in state  # n0's entry outlived its agent's lease

    assert a.shutdown()  # n0's entry goes: the run id starts a new job, as torchrun runs a finished run id again
    fresh = make(handlers, etcd_endpoint, run_id, "n3", (1, 1))
    assert not fresh.is_closed()
    assert rendezvous(fresh)[0].world_size == 1
    assert keys_of(run_id, 2).node("n3") in job_keys(etcd_endpoint, run_id)
    assert not fresh.is_closed()


def test_set_closed_before_joining_closes_the_run(handlers, etcd_endpoint, run_id):
    """A handler that closes the rendezvous before it joined closes the run for later handlers too."""
    a = make(handlers, etcd_endpoint, run_id, "n0")
    a.set_closed()
    assert a.is_closed()
    with pytest.raises(RendezvousClosedError, match="set_closed"):
        background(a.next_rendezvous).result(timeout=30)
    late = make(handlers, etcd_endpoint, run_id, "n1")
    assert late.is_closed()
    with pytest.raises(RendezvousClosedError, match="set_closed"):
        background(late.next_rendezvous).result(timeout=30)


def test_a_late_node_scales_the_job_up(handlers, etcd_endpoint, run_id):
    a, b, c = (make(handlers, etcd_endpoint, run_id, n, (2, 3), scale_settle="0.2") for n in ("n0", "n1", "n2"))
    first = rendezvous(a, b)
    assert {i.world_size for i in first} == {2}
    late = background(c.next_rendezvous)
    poll_until(lambda: a.num_nodes_waiting() > 0 and b.num_nodes_waiting() > 0, 60,
               "the members to see the scale-up round")
    second = rendezvous(a, b) + [late.result(timeout=30)]
    assert [i.world_size for i in second] == [3, 3, 3]
    assert [i.rank for i in second[:2]] == [i.rank for i in first]  # the members keep their ranks
    assert second[2].rank == 2
    assert job_keys(etcd_endpoint, run_id)[keys_of(run_id).restarts()]["used"] == 0  # scale-ups are not counted


def test_lost_session_kills_workers_torch_does_not_stop(handlers, etcd_endpoint, run_id):
    """Fencing: the session is lost while torch's agent does not react (a hung monitor loop): the handler kills
    the run's worker processes itself, before the lease could expire, and asks for a new round."""
    a, b = (make(handlers, etcd_endpoint, run_id, n, lease_ttl="3") for n in ("n0", "n1"))
    rendezvous(a, b)
    # a worker that stays alive until it is killed (a stand-in for work, not a wait)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                              env={**os.environ, "TORCHELASTIC_RUN_ID": run_id})
    try:
        etcd = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
        try:
            etcd.lease_revoke(a.agent.session.lease_id)  # the session ends under the agent
        finally:
            etcd.close()
        worker.wait(timeout=90)  # it would sleep 120 s: it ended because the handler killed it
        assert worker.returncode == -9
        assert a.num_nodes_waiting() > 0
        poll_until(lambda: b.num_nodes_waiting() > 0, 60, "n1 to see n0 leave its round")
    finally:
        if worker.poll() is None:
            worker.kill()


def test_status_reads_a_torchrun_job(handlers, etcd_endpoint, run_id):
    """``etcd-agent status`` on a job of torchrun's backend: the store's keys (torch's own, not JSON) are skipped,
    and the plan says that torchrun assigns the worker ranks."""
    a, b = (make(handlers, etcd_endpoint, run_id, n) for n in ("n0", "n1"))
    infos = rendezvous(a, b)
    infos[0].store.set("torchelastic/role_info/0", b"\x80\x04binary")
    late = make(handlers, etcd_endpoint, run_id, "n2")  # the round is full (--nnodes 2): n2 waits for the next
    background(late.next_rendezvous)
    poll_until(lambda: keys_of(run_id).node("n2") in job_keys(etcd_endpoint, run_id), 60, "n2 to register")
    out = subprocess.run([sys.executable, "-m", "etcd_agent", "status", "--etcd-endpoints", etcd_endpoint,
                          "--run-id", run_id], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "plan: 2 node(s), torchrun's agents assign the worker ranks" in out.stdout
    assert "restarts: 0 (no job-wide limit) used" in out.stdout
    assert "group rank 0: n" in out.stdout and "ranks 0-0" not in out.stdout
    assert out.stdout.count(", alive") == 2 and "waiting for the next round: n2" in out.stdout
