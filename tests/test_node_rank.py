"""torchrun's static-rendezvous flags on real agent processes: ``--node-rank`` pins the group rank, two live nodes
cannot share one, and ``--master-addr``/``--master-port`` become the workers' MASTER_ADDR/MASTER_PORT."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from agents import JOB, AgentProc, job_keys, keys_of, plan_nodes, plan_of, records, wait_all, wait_for_key

from etcd_agent.coord import txns
from etcd_agent.coord.coordinator import Coordinator
from etcd_agent.config import AgentConfig, EtcdConfig, JobSpec, WorkerConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.proctree import free_port


def agent(etcd_endpoint, run_id, tmp_path, node: str, rank: int, *extra: str) -> AgentProc:
    """An agent of a 2-node job with ``--node-rank rank`` and short leases, its workers recording to tmp_path/out."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return AgentProc(etcd_endpoint, run_id, node, tmp_path, [str(out)], nnodes="2", nproc=2,
                     extra=["--node-rank", str(rank), "--lease-ttl", "3", *extra])


def test_pinned_ranks_and_master_address_are_what_the_flags_say(etcd_endpoint, run_id, tmp_path):
    port = free_port("127.0.0.1")
    static = ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    # The node pinned to rank 1 joins first: join order would make it rank 0.
    first = agent(etcd_endpoint, run_id, tmp_path, "node-a", 1, *static)
    wait_for_key(etcd_endpoint, keys_of(run_id).join(1, "node-a"))
    second = agent(etcd_endpoint, run_id, tmp_path, "node-b", 0, *static)
    assert wait_all([first, second]) == [0, 0], [a.stderr()[-3000:] for a in (first, second)]
    members = plan_of(job_keys(etcd_endpoint, run_id, gen=1), keys_of(run_id).plan(1)).members
    assert [(m.node, m.group_rank, m.rank_offset) for m in members] == [("node-b", 0, 0), ("node-a", 1, 2)]
    envs = [r["env"] for r in records(tmp_path / "out").values()]
    assert len(envs) == 4
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("127.0.0.1", str(port))}
    assert sorted((e["GROUP_RANK"], e["RANK"]) for e in envs) == [("0", "0"), ("0", "1"), ("1", "2"), ("1", "3")]


@pytest.mark.chaos  # the holder's agent is SIGKILLed
def test_a_taken_rank_is_a_clear_error_and_is_free_again_once_its_holder_died(etcd_endpoint, run_id, tmp_path):
    holder = agent(etcd_endpoint, run_id, tmp_path, "node-a", 0)
    wait_for_key(etcd_endpoint, keys_of(run_id).node_rank(0))
    duplicate = agent(etcd_endpoint, run_id, tmp_path, "node-b", 0)
    assert duplicate.wait(60) == 2
    err = duplicate.stderr()
    assert f"--node-rank 0 is already taken by node node-a (pid {holder.proc.pid} on host" in err, err[-3000:]
    assert "give each node its own --node-rank" in err and "Traceback" not in err
    assert holder.proc.poll() is None, "the holder is untouched"

    holder.kill()  # its lease expires within its TTL: a replacement started now waits for that, then takes rank 0
    replacement = agent(etcd_endpoint, run_id, tmp_path, "node-c", 0)
    other = agent(etcd_endpoint, run_id, tmp_path, "node-d", 1)
    assert wait_all([replacement, other]) == [0, 0], [a.stderr()[-3000:] for a in (replacement, other)]
    assert plan_nodes(job_keys(etcd_endpoint, run_id, gen=1), keys_of(run_id).plan(1)) == ["node-c", "node-d"]


def test_a_re_created_session_claims_its_rank_again_on_the_new_lease(etcd_endpoint, run_id):
    cfg = AgentConfig(run_id=run_id, node_id="node-a", spec=JobSpec(2, 2, "1", 0), workers=WorkerConfig(JOB, (), 1),
                      etcd=EtcdConfig(parse_endpoints(etcd_endpoint), request_timeout=1.0), lease_ttl=3, node_rank=1)
    c = Coordinator(cfg, "test", queue.SimpleQueue().put, threading.Event())
    try:
        c.keys = txns.init_job(c.etcd, c.run_keys, cfg.spec, time.time())
        c.new_session(lambda session, why: None)
        old = c.session.lease_id
        assert c.etcd.get(c.keys.node_rank(1))[0].lease == old
        c.session.close(revoke=False)  # as when fencing: the old lease is revoked by the new session
        c.new_session(lambda session, why: None, [old])
        kv, _ = c.etcd.get(c.keys.node_rank(1))
        assert kv.lease == c.session.lease_id != old
    finally:
        c.session.close(revoke=True)
        c.etcd.close()
