"""A plan in parts with real agents: what a restart round costs etcd in bytes sent, counted by etcd itself (its
/metrics): O(N), not O(N^2); and a job whose plan has several parts, from its first round to its end.

Every member reads only the plan's header and its own part (``schema/plan.py``); only the leader reads the whole
plan. With the default part size (16 members) a job needs more than 16 nodes before a part is smaller than the
plan, so the test shrinks the part size to 4 members: at N=16 and N=64 the plan then has 4 and 16 parts, as jobs
of 64 and 256 nodes have by default. Long node names make a plan entry large next to what else a round sends
(round keys, joins, keepalives), so a quadratic term stands out. The bound is 1.5 x 64/16 = 6; the plan as one key
(every member reading every member) fails it. Bytes and counts only, no times.
"""

from __future__ import annotations

import time


from etcd_agent.config import EtcdConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.etcd.client import Etcd
from etcd_agent.etcd.server import EtcdServer
from etcd_agent.ops.exporter_model import RunModel, job_view
from etcd_agent.ops.status import run_snapshot
from etcd_agent.schema.keys import RunKeys
from etcd_agent.schema import plan as plan_module
from etcd_agent.testing.sim import JobParams, SimJob
from test_protocol_counts import WAIT, settle
from etcd_agent.testing.metrics import diff

SMALL, LARGE = 16, 64


def restart_round_bytes(server: EtcdServer, run_id: str, n: int) -> dict:
    """etcd's counters over one restart round (a worker crash -> every node's workers started again) of N nodes."""
    nodes = [f"node-{i:03d}-" + "x" * 80 for i in range(n)]
    params = JobParams(server.endpoint, run_id, min_nodes=n, max_nodes=n, lease_ttl=10, last_call=30.0,
                       join_timeout=120.0, max_restarts=5)
    with SimJob(params) as job:
        job.start(nodes)
        first = job.wait_round(1, nodes, timeout=WAIT)
        before = settle(server)
        crasher = next(node for node, s in first.items() if s.group_rank == n // 2)
        assert job.end_workers([crasher], code=1) == 1
        job.wait_round(2, nodes, timeout=WAIT)
        return diff(before, settle(server))


def test_bytes_sent_in_a_restart_round_grow_linearly_in_n(private_etcd, run_id, monkeypatch):
    monkeypatch.setattr(plan_module, "PART_SIZE", 4)
    small = restart_round_bytes(private_etcd, run_id + "-small", SMALL)
    large = restart_round_bytes(private_etcd, run_id + "-large", LARGE)
    ratio = large["sent_bytes"] / small["sent_bytes"]
    print(f"bytes sent in a restart round: N={SMALL} {small['sent_bytes']:.0f}, N={LARGE} {large['sent_bytes']:.0f}, "
          f"ratio {ratio:.2f}")
    assert ratio <= 1.5 * LARGE / SMALL, (small["sent_bytes"], large["sent_bytes"])


def test_a_job_whose_plan_has_several_parts_forms_restarts_and_ends(private_etcd, run_id, monkeypatch):
    """Eight nodes, a plan of parts of two: each non-leader holds the header and its own part only, yet starts its
    workers with the right sizes; a graceful leave is seen through the ring (a predecessor named by a part); and
    the exit barrier ends the job, its last node reading the whole plan to know the exits are every member's."""
    monkeypatch.setattr(plan_module, "PART_SIZE", 2)
    nodes = [f"n{i}" for i in range(8)]
    params = JobParams(private_etcd.endpoint, run_id, min_nodes=7, max_nodes=8, lease_ttl=10, last_call=30.0,
                       join_timeout=120.0, max_restarts=5)
    with SimJob(params) as job:
        job.start(nodes)
        first = job.wait_round(1, nodes, timeout=WAIT)
        assert {(s.world_size, s.group_world_size) for s in first.values()} == {(8, 8)}
        assert sorted(s.group_rank for s in first.values()) == list(range(8))
        held = {n: job.agents[n].coord.mirror.plan(1) for n in nodes}
        partial = [n for n, p in held.items() if not p.complete]
        assert len(partial) == 7 and all(held[n].member(n).group_rank == first[n].group_rank for n in partial)
        run = RunKeys(params.root, run_id)
        etcd = Etcd(EtcdConfig(parse_endpoints(private_etcd.endpoint)))
        kvs, rev = etcd.get_prefix(run.prefix)
        etcd.close()
        shown = run_snapshot(run, kvs, rev)["plan"]  # status --json: the whole plan, assembled from its parts
        assert shown["parts"] == 4 and [m["node"] for m in shown["members"]] == [
            n for n, _s in sorted(first.items(), key=lambda ns: ns[1].group_rank)]
        exported = job_view(RunModel(run, {kv.key: kv for kv in kvs}), time.time())  # the exporter's model
        assert (exported.planned, exported.world_size, exported.problems) == (8, 8, 0)
        leaver = next(n for n, s in first.items() if s.group_rank == 3)
        job.leave(leaver)
        survivors = [n for n in nodes if n != leaver]
        second = job.wait_round(2, survivors, timeout=WAIT)
        assert {(s.world_size, s.group_world_size) for s in second.values()} == {(7, 7)}
        before = settle(private_etcd)
        assert job.end_workers(survivors) == 7
        done = job.wait_done(survivors, timeout=WAIT)
        assert {d.code for d in done.values()} == {0}, done
        ended = diff(before, settle(private_etcd))  # one exit key per node, then the round and the result
        assert ended["key_puts"] <= len(survivors) + 2 and ended["rpc_txn"] <= len(survivors) + 4, ended
