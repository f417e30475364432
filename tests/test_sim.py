"""Smoke test of the simulation library (etcd_agent/testing/sim.py): real in-process agents with stand-in workers."""

from __future__ import annotations

from etcd_agent.testing.sim import JobParams, SimJob

WAIT = 30.0  # every wait is bounded; a healthy run takes about a second


def test_five_agents_rendezvous_then_four_survive_a_graceful_leave(etcd_endpoint, run_id):
    nodes = [f"sim-{i}" for i in range(5)]
    # The last call is long: round 1 closes when all 5 joined (the MAX rule), never early with 4.
    params = JobParams(etcd_endpoint, run_id, min_nodes=4, max_nodes=5, lease_ttl=3, last_call=60.0,
                       join_timeout=60.0)
    with SimJob(params) as job:
        job.start(nodes)
        first = job.wait_round(1, nodes, timeout=WAIT)
        assert sorted(s.group_rank for s in first.values()) == [0, 1, 2, 3, 4]
        assert {s.world_size for s in first.values()} == {5}

        leaver = next(n for n, s in first.items() if s.group_rank == 2)
        job.leave(leaver)
        survivors = [n for n in nodes if n != leaver]
        second = job.wait_round(2, survivors, timeout=WAIT)
        assert sorted(s.group_rank for s in second.values()) == [0, 1, 2, 3]
        assert {s.world_size for s in second.values()} == {4}
        done = job.wait_done([leaver], timeout=WAIT)[leaver]
        assert done.code is None and done.error.startswith("JobStopped"), done

        job.end_workers(survivors, code=0)  # the job ends: every survivor's workers exit 0
        results = job.wait_done(survivors, timeout=WAIT)
        assert {n: d.code for n, d in results.items()} == {n: 0 for n in survivors}
