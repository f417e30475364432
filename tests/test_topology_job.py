"""Topology-aware ranks in a whole job: real agents on loopback against a real etcd, each started with its own
``--topology``. The plan's group ranks follow the blocks, not the start order; ``status`` shows each node's path;
a spare in the lost node's leaf takes its rank even though a spare in the other leaf joined first."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agents import job_keys, keys_of, plan_of, records, start_agents, until_recorded, wait_all, wait_logged
from test_spares import node_of

LEAVES = {"node-0": "/spine1/leaf1", "node-1": "/spine1/leaf2", "node-2": "/spine1/leaf1", "node-3": "/spine1/leaf2",
          "node-4": "/spine1/leaf1", "node-5": "/spine1/leaf2"}


def start(endpoint, run_id, tmp_path, i, release, *flags):
    """node-i alone (so that the start order is the join order), with its leaf as --topology."""
    agents, out = start_agents(1, endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1, nnodes="4",
                               first=i, extra=["--max-restarts", "3", "--topology", LEAVES[f"node-{i}"], *flags])
    return agents[0], out


@pytest.mark.chaos
def test_group_ranks_follow_the_leaves_and_a_lost_rank_goes_to_the_spare_in_its_leaf(etcd_endpoint, run_id,
                                                                                      tmp_path):
    release = tmp_path / "release"
    members = []
    for i in range(4):  # leaf1, leaf2, leaf1, leaf2: interleaved
        agent, out = start(etcd_endpoint, run_id, tmp_path, i, release)
        members.append(agent)
        wait_logged(agent, "joined round 1", 30)  # joined before the next one starts: the join order is 0, 1, 2, 3
    until_recorded(out, lambda r: len([k for k in r if k[0] == 1]) == 4, "round 1 on four nodes", members, 60)
    first = {rank: node_of(r) for (rnd, rank), r in records(out).items() if rnd == 1}
    assert first == {0: "node-0", 1: "node-2", 2: "node-1", 3: "node-3"}  # leaf1's two, then leaf2's two
    plan = plan_of(job_keys(etcd_endpoint, run_id), keys_of(run_id).plan(1))
    assert [(m.node, m.topology) for m in plan.members] == [(n, LEAVES[n]) for n in ("node-0", "node-2", "node-1",
                                                                                       "node-3")]

    spare_leaf1, _ = start(etcd_endpoint, run_id, tmp_path, 4, release, "--spare")
    wait_logged(spare_leaf1, "waiting to be taken into the next round", 30)
    spare_leaf2, _ = start(etcd_endpoint, run_id, tmp_path, 5, release, "--spare")
    wait_logged(spare_leaf2, "waiting to be taken into the next round", 30)
    shown = subprocess.run([sys.executable, "-m", "etcd_agent", "status", "--etcd-endpoints", etcd_endpoint,
                            "--run-id", run_id], capture_output=True, text=True, timeout=120).stdout
    assert "group rank 1: node-2 (127.0.0.1 at /spine1/leaf1) rank 1, alive" in shown, shown
    assert "node-4 (spare) at /spine1/leaf1, node-5 (spare) at /spine1/leaf2" in shown, shown

    victim = members[3]  # node-3, leaf2, group rank 3
    victim.kill()
    until_recorded(out, lambda r: len([k for k in r if k[0] == 2]) == 4, "round 2 with a spare", timeout=60)
    second = {rank: node_of(r) for (rnd, rank), r in records(out).items() if rnd == 2}
    assert second == {0: "node-0", 1: "node-2", 2: "node-1", 3: "node-5"}  # leaf2's spare, not the earlier node-4
    release.touch()
    rest = members[:3] + [spare_leaf1, spare_leaf2]
    assert wait_all(rest) == [0] * 5, [a.stderr()[-2000:] for a in rest]
