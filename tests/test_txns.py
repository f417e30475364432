"""The guarded txns against a real etcd: each one refuses to act on a view that changed underneath it."""

from __future__ import annotations

import time

from etcd_agent import txns
from etcd_agent.config import EtcdConfig, JobSpec, parse_endpoints
from etcd_agent.etcd import Etcd, op_delete
from etcd_agent.keys import Keys, encode
from etcd_agent.rendezvous import Bump, Local, Params, WriteExit, build_plan, decide
from etcd_agent.state import Mirror


def setup(endpoint: str, run_id: str, nodes=("a", "b")):
    etcd = Etcd(EtcdConfig(parse_endpoints(endpoint)))
    keys = Keys("/etcd-agent", run_id)
    txns.init_job(etcd, keys, JobSpec(2, 2, "1", 3), time.time())
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


def test_bump_and_exit_cannot_both_happen(etcd_endpoint, run_id):
    etcd, keys = setup(etcd_endpoint, run_id)
    v = view(etcd, keys)
    plan = build_plan(1, list(v.joins.values()), PARAMS, 0)
    assert txns.close(etcd, keys, decide(v, Local("a", now=0.0, wall=0.0), PARAMS), time.time()).succeeded
    running = view(etcd, keys)
    assert running.plan.nodes == plan.nodes
    assert txns.write_exit(etcd, keys, WriteExit(running.round), "a", time.time()).succeeded
    rs = running.restarts
    bump = Bump(running.round, "b failed", counted=True, failure={"rank": 1, "time": 1.0})
    assert not txns.bump(etcd, keys, bump, rs.used, rs.max, rs.mod_revision, "b", time.time()).succeeded
    after = view(etcd, keys)
    assert after.round.number == 1 and after.restarts.used == 0
    assert "b" in after.failures, "the report is kept even when the bump loses"
