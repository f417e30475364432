"""The guarded txns against a real etcd: each one refuses to act on a view that changed underneath it."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time

import pytest

from etcd_agent.coord import cas, jobs, txns
from etcd_agent.config import EtcdConfig, JobSpec
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.errors import EXIT_USAGE, BadKeyData, NodeRankTaken, SpecMismatch
from etcd_agent.etcd.client import Etcd, op_delete, op_put
from etcd_agent.schema.keys import Keys, RunKeys, encode
from etcd_agent.coord.decide import Bump, Local, Params, WriteExit, decide
from etcd_agent.coord.ranks import build_plan
from etcd_agent.coord.mirror import Mirror
from etcd_agent.schema.values import Failure, RankClaim
from etcd_agent.etcd.watch import wait_deleted


def setup(endpoint: str, run_id: str, nodes=("a", "b")):
    etcd = Etcd(EtcdConfig(parse_endpoints(endpoint)))
    keys = txns.init_job(etcd, RunKeys("/etcd-agent", run_id), JobSpec(2, 2, "1", 3), time.time())
    for node in nodes:
        etcd.put(keys.node(node), encode({"node": node}))
        etcd.put(keys.join(1, node), encode({"node": node, "addr": "127.0.0.1", "port": 1, "nproc": 1}))
    return etcd, keys


def view(etcd: Etcd, keys: Keys):
    m = Mirror(keys)
    m.reset(*etcd.get_prefix(keys.prefix))
    return m.view()


PARAMS = Params(2, 2, 3, 1.0, 60.0, 1.0)


def test_close_refuses_a_plan_whose_member_left_in_between(etcd_endpoint, run_id):
    etcd, keys = setup(etcd_endpoint, run_id)
    v = view(etcd, keys)
    action = decide(v, Local("a", now=0.0, wall=0.0), PARAMS)
    etcd.txn([], [op_delete(keys.join(1, "b"))])  # node b's session ended after the leader looked
    assert not txns.close(etcd, keys, action, time.time()).succeeded
    v = view(etcd, keys)
    assert v.plan is None and v.round.phase == "joining"


def test_closing_with_more_members_than_a_txn_has_compares(etcd_endpoint, run_id):
    """130 members (etcd allows 128 compares per txn): the close is guarded for every one of them."""
    nodes = [f"n{i:03d}" for i in range(130)]
    etcd, keys = setup(etcd_endpoint, run_id, nodes)
    many = Params(130, 130, 3, 1.0, 60.0, 1.0)
    action = decide(view(etcd, keys), Local("n000", now=0.0, wall=0.0), many)
    assert len(action.plan.members) == 130
    last = keys.join(1, nodes[-1])  # beyond the first 100 members: re-joins with a new session after the view
    etcd.txn([], [op_delete(last)])
    etcd.put(last, encode({"node": nodes[-1], "addr": "127.0.0.1", "port": 1, "nproc": 1}))
    assert not txns.close(etcd, keys, action, time.time()).succeeded
    again = decide(view(etcd, keys), Local("n000", now=0.0, wall=0.0), many)
    assert txns.close(etcd, keys, again, time.time()).succeeded
    assert len(view(etcd, keys).plan.members) == 130


def test_bump_and_exit_cannot_both_happen(etcd_endpoint, run_id):
    etcd, keys = setup(etcd_endpoint, run_id)
    v = view(etcd, keys)
    plan = build_plan(1, list(v.joins.values()), PARAMS, 0)
    assert txns.close(etcd, keys, decide(v, Local("a", now=0.0, wall=0.0), PARAMS), time.time()).succeeded
    running = view(etcd, keys)
    assert running.plan.nodes == plan.nodes
    assert txns.write_exit(etcd, keys, WriteExit(running.round), "a", time.time()).succeeded
    rs = running.restarts
    bump = Bump(running.round, "b failed", counted=True, failure=Failure(1, time=1.0))
    assert not txns.bump(etcd, keys, bump, rs.used, rs.max, rs.mod_revision, "b", time.time()).succeeded
    after = view(etcd, keys)
    assert after.round.number == 1 and after.restarts.used == 0
    assert "b" in after.failures, "the report is kept even when the bump loses"


# --- the run's jobs: R/job and one generation per job --------------------------------------------------------------

SPEC = JobSpec(1, 2, "1", 0)


def client(endpoint: str) -> Etcd:
    return Etcd(EtcdConfig(parse_endpoints(endpoint)))


def end_job(etcd: Etcd, keys: Keys, outcome: str = "succeeded") -> None:
    etcd.put(keys.result(), encode({"outcome": outcome, "round": 1, "reason": "test", "root_cause": None}))


def pointer(etcd: Etcd, run: RunKeys) -> dict:
    kv, _ = etcd.get(run.job())
    return json.loads(kv.value)


def test_the_first_agent_creates_job_1_and_later_ones_join_it(etcd_endpoint, run_id):
    etcd, run = client(etcd_endpoint), RunKeys("/etcd-agent", run_id)
    keys = txns.init_job(etcd, run, SPEC, time.time())
    assert keys == run.generation(1) and pointer(etcd, run)["gen"] == 1
    v = view(etcd, keys)
    assert v.spec.max_nodes == 2 and (v.round.number, v.round.phase) == (1, "joining") and v.restarts.used == 0
    assert txns.init_job(etcd, run, SPEC, time.time()) == keys, "a running job is joined, not replaced"
    with pytest.raises(SpecMismatch, match="--nnodes \\(maximum\\) is 3 here but 2 in the running job"):
        txns.init_job(etcd, run, JobSpec(1, 3, "1", 0), time.time())
    assert pointer(etcd, run)["gen"] == 1


def test_a_finished_job_is_followed_by_a_new_one_and_stays_readable(etcd_endpoint, run_id):
    etcd, run = client(etcd_endpoint), RunKeys("/etcd-agent", run_id)
    first = txns.init_job(etcd, run, SPEC, time.time())
    end_job(etcd, first, "failed")
    other_spec = JobSpec(2, 2, "1", 1)  # a finished job's spec binds nothing
    second = txns.init_job(etcd, run, other_spec, time.time())
    assert second == run.generation(2) and pointer(etcd, run)["gen"] == 2
    assert view(etcd, first).result.outcome == "failed"
    v = view(etcd, second)
    assert v.result is None and v.spec.min_nodes == 2 and v.round.number == 1 and v.restarts.max == 1
    assert txns.current_job(etcd, run) == second
    assert txns.stop_job(etcd, second, "test", time.time())
    assert view(etcd, second).result.outcome == "stopped" and view(etcd, first).result.outcome == "failed"


def test_concurrent_re_starters_all_land_in_one_new_job(etcd_endpoint, run_id):
    run = RunKeys("/etcd-agent", run_id)
    setup_etcd = client(etcd_endpoint)
    end_job(setup_etcd, txns.init_job(setup_etcd, run, SPEC, time.time()))
    n = 8
    clients = [client(etcd_endpoint) for _ in range(n)]
    barrier = threading.Barrier(n)

    def start(etcd):
        barrier.wait()
        return txns.init_job(etcd, run, SPEC, time.time())

    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            got = list(pool.map(start, clients))
    finally:
        for etcd in clients:
            etcd.close()
    assert set(got) == {run.generation(2)}
    assert pointer(setup_etcd, run)["gen"] == 2
    kvs, _ = setup_etcd.get_prefix(run.prefix)
    assert {run.generation_of(kv.key) for kv in kvs} == {None, 1, 2}, "exactly one new job"


def test_a_stale_pointer_cannot_start_a_second_new_job(etcd_endpoint, run_id):
    etcd, run = client(etcd_endpoint), RunKeys("/etcd-agent", run_id)
    end_job(etcd, txns.init_job(etcd, run, SPEC, time.time()))
    kv, _ = etcd.get(run.job())
    assert jobs.new_generation(etcd, run, 2, kv.mod_revision, SPEC, time.time())
    assert not jobs.new_generation(etcd, run, 2, kv.mod_revision, SPEC, time.time()), "the loser re-reads"
    assert not jobs.new_generation(etcd, run, 1, 0, SPEC, time.time())
    assert txns.init_job(etcd, run, SPEC, time.time()) == run.generation(2)


@pytest.mark.parametrize("value, problem", [
    (b"junk", "not JSON"), (b'{"v":1}', "missing field(s) gen"), (b'{"v":1,"gen":"2"}', "gen must be a whole number"),
    (b'{"v":1,"gen":0}', "positive integer"), (b'{"v":1,"gen":true}', "gen must be a whole number"),
])
def test_a_bad_pointer_names_its_key(etcd_endpoint, run_id, value, problem):
    etcd, run = client(etcd_endpoint), RunKeys("/etcd-agent", run_id)
    txns.init_job(etcd, run, SPEC, time.time())
    etcd.put(run.job(), value)
    with pytest.raises(BadKeyData) as caught:
        txns.init_job(etcd, run, SPEC, time.time())
    assert caught.value.key == run.job() and problem in str(caught.value)


def test_missing_keys_of_the_run_are_named(etcd_endpoint, run_id):
    etcd, run = client(etcd_endpoint), RunKeys("/etcd-agent", run_id)
    txns.init_job(etcd, run, SPEC, time.time())
    etcd.put(run.job(), encode({"gen": 5}))
    with pytest.raises(BadKeyData) as caught:
        txns.init_job(etcd, run, SPEC, time.time())
    assert caught.value.key == run.generation(5).spec() and run.job() in str(caught.value)
    etcd.txn([], [op_delete(run.job())])
    with pytest.raises(BadKeyData) as caught:
        txns.init_job(etcd, run, SPEC, time.time())
    assert caught.value.key == run.job() and "missing" in str(caught.value)


# --- the --node-rank claim ---------------------------------------------------------------------------------------

def claim_setup(endpoint: str, run_id: str):
    return Etcd(EtcdConfig(parse_endpoints(endpoint))), RunKeys("/etcd-agent", run_id).generation(1)


def holder(node: str, lease: int) -> RankClaim:
    return RankClaim(node, 1, f"host-{node}", 4242, f"{lease:x}")


def test_a_node_rank_claim_is_held_on_the_claimers_lease(etcd_endpoint, run_id):
    etcd, keys = claim_setup(etcd_endpoint, run_id)
    lease = etcd.lease_grant(30)
    txns.claim_node_rank(etcd, keys, 1, holder("n1", lease), lease, wait=0.0)
    kv, _ = etcd.get(keys.node_rank(1))
    assert kv.lease == lease and b'"node":"n1"' in kv.value
    assert keys.parse(kv.key).kind == "node_rank" and keys.parse(kv.key).rank == 1


def test_a_retried_claim_recognises_its_own_key(etcd_endpoint, run_id):
    etcd, keys = claim_setup(etcd_endpoint, run_id)
    lease = etcd.lease_grant(30)
    first = txns.claim_node_rank(etcd, keys, 1, holder("n1", lease), lease, wait=0.0)
    again = txns.claim_node_rank(etcd, keys, 1, holder("n1", lease), lease, wait=0.0)  # as if the reply was lost
    assert again >= first
    assert etcd.get(keys.node_rank(1))[0].mod_revision == first, "the retry did not write a second time"


def test_a_rank_held_by_another_live_agent_is_a_clear_error_naming_the_holder(etcd_endpoint, run_id, monkeypatch):
    etcd, keys = claim_setup(etcd_endpoint, run_id)
    theirs, ours = etcd.lease_grant(30), etcd.lease_grant(30)
    txns.claim_node_rank(etcd, keys, 1, holder("n2", theirs), theirs, wait=0.0)
    waits = []  # each wait for the holder's key to go: (key, whether it went)

    def recorded(etcd, key, revision, timeout):
        waits.append((key, wait_deleted(etcd, key, revision, timeout)))
        return waits[-1][1]
    monkeypatch.setattr(txns, "wait_deleted", recorded)
    with pytest.raises(NodeRankTaken) as err:
        txns.claim_node_rank(etcd, keys, 1, holder("n1", ours), ours, wait=0.5)
    assert waits == [(keys.node_rank(1), False)], "it waited for the holder to go away first"
    text = str(err.value)
    assert text.startswith("--node-rank 1 is already taken by node n2 (pid 4242 on host host-n2")
    assert f"in job {keys.run_id}" in text and "give each node its own --node-rank" in text
    assert err.value.exit_code == EXIT_USAGE
    assert etcd.get(keys.node_rank(1))[0].lease == theirs
    txns.claim_node_rank(etcd, keys, 10, holder("n1", ours), ours, wait=0.0)  # another rank is free


def test_the_claims_wait_sees_only_its_own_keys_delete_even_one_before_the_watch_began(etcd_endpoint, run_id):
    etcd, keys = claim_setup(etcd_endpoint, run_id)
    one, ten = keys.node_rank(1), keys.node_rank(10)  # the watched range of node_ranks/1 covers node_ranks/10 too
    etcd.put(one, encode({"node": "n"}))
    read = etcd.put(ten, encode({"node": "m"}))
    etcd.txn([], [op_delete(ten)])
    assert not wait_deleted(etcd, one, read, 0.3)
    etcd.txn([], [op_delete(one)])  # after the read and before the watch: "watch from the read's revision + 1"
    assert wait_deleted(etcd, one, read, 10.0)


def test_a_claim_waits_for_a_holder_whose_lease_is_revoked(etcd_endpoint, run_id):
    etcd, keys = claim_setup(etcd_endpoint, run_id)
    theirs, ours = etcd.lease_grant(30), etcd.lease_grant(30)
    txns.claim_node_rank(etcd, keys, 0, holder("n2", theirs), theirs, wait=0.0)

    class RevokeWhenWaiting(logging.Handler):  # the holder dies once the claimer has started to wait for it
        def emit(self, record):
            if "is held by" in record.getMessage():
                threading.Thread(target=etcd.lease_revoke, args=(theirs,)).start()

    handler = RevokeWhenWaiting()
    log = logging.getLogger("etcd_agent.coord.txns")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:  # a wait longer than the test may run: the claim returned because the watch saw the delete
        txns.claim_node_rank(etcd, keys, 0, holder("n1", ours), ours, wait=600.0)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    kv, _ = etcd.get(keys.node_rank(0))
    assert kv.lease == ours and b'"node":"n1"' in kv.value


def test_a_compare_and_swap_reads_again_until_it_wins_and_gives_up_naming_the_key():
    answers = iter([cas.AGAIN, cas.AGAIN, "done"])
    assert cas.swap(lambda: next(answers), "/k", "do it") == "done"
    assert cas.swap(lambda: False, "/k", "do it") is False  # any answer but AGAIN ends the loop
    tries = []
    with pytest.raises(BadKeyData, match=r"etcd key /k: kept changing while this agent tried to do it \(3 tries"):
        cas.swap(lambda: tries.append(1) or cas.AGAIN, "/k", "do it", tries=3)
    assert len(tries) == 3


def test_close_job_reads_the_round_again_after_losing_its_compare(etcd_endpoint, run_id):
    etcd, keys = setup(etcd_endpoint, run_id)
    real, calls = etcd.txn, []

    def txn(compare, success, failure=(), where="txn", deadline=None):
        calls.append(where)
        if where.startswith("end the job") and calls.count(where) == 1:  # another writer moves the round first
            real([], [op_put(keys.round(), txns.round_value(1, "joining", "moved", time.time()))])
        return real(compare, success, failure, where, deadline)

    etcd.txn = txn
    assert txns.stop_job(etcd, keys, "the test", time.time())
    assert calls.count(f"read {keys.round()}") == 2 and txns.current_job(etcd, keys.run) == keys
