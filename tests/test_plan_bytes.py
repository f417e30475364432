"""What a restart round costs etcd in bytes sent, counted by etcd itself (its /metrics): O(N), not O(N^2).

Every member reads only the plan's header and its own part (``schema/plan.py``); only the leader reads the whole
plan. With the default part size (64 members) a job needs more than 64 nodes before a part is smaller than the
plan, so the test shrinks the part size to 4 members: at N=16 and N=64 the plan then has 4 and 16 parts, as jobs
of 256 and 1024 nodes have by default. Long node names make a plan entry large next to what else a round sends
(round keys, joins, keepalives), so a quadratic term stands out. The bound is 1.5 x 64/16 = 6; the plan as one key
(every member reading every member) fails it. Bytes and counts only, no times.
"""

from __future__ import annotations

import pytest

from etcd_agent.etcd.server import EtcdServer
from etcd_agent.schema import plan as plan_module
from etcd_agent.testing.sim import JobParams, SimJob
from test_protocol_counts import WAIT, settle
from etcd_agent.testing.metrics import diff

SMALL, LARGE = 16, 64


@pytest.fixture
def private_etcd():
    server = EtcdServer(name="etcd-agent-plan-bytes")
    server.start()
    yield server
    server.stop()


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
