"""deploy/slurm.sbatch and deploy/slurm-torchrun.sbatch, run unchanged by Slurm on the 3-node bed.

Each test submits the recipe with `sbatch --nodes=3 --gpus-per-node=0` and the environment a user gives it (PATH
with the project's install, ETCD_AGENT_ENDPOINTS for the bed's 3-member etcd, NPROC_PER_NODE=2), waits for the
Slurm job to end, then checks etcd (the job succeeded, one plan of node1..node3) and the workers' records (ranks
0..5, two on each host, each host seen by its own workers under its own name).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from agents import job_keys, plan_of

from . import bed as cluster_bed
from .slurm import NPROC, job_output, records, status, submit, wait_end

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

def check_one_round_on_every_host(out: Path, run_id: str) -> dict[tuple[int, int], dict]:
    """Round 1 only, ranks 0..5, two on each host, under that host's name; one plan in etcd, whose member at each
    group rank is the node of that host (its id starts with the host name) at an address that is the host's own."""
    found = records(out)
    assert sorted(found) == [(1, r) for r in range(NPROC * len(cluster_bed.NODES))], sorted(found)
    keys = job_keys(cluster_bed.etcd_endpoints(), run_id)
    plans = [k for k in keys if k.endswith("/plan")]
    assert len(plans) == 1, sorted(keys)
    members = [(m.node, m.nproc, m.addr) for m in plan_of(keys, plans[0]).members]  # in group-rank order
    assert len(members) == len(cluster_bed.NODES), members
    for (_, rank), rec in found.items():
        env, host = rec["env"], rec["host"]
        assert host == env["SLURMD_NODENAME"], rec  # the worker sees its node's own host name
        group_rank = int(env["GROUP_RANK"])
        assert group_rank == rank // NPROC and env["WORLD_SIZE"] == str(NPROC * len(members)), env
        node, nproc, addr = members[group_rank]
        assert node.split("-")[0] == host and nproc == NPROC, (members, rec)
        assert socket.gethostbyname(addr) == cluster_bed.address(host), (members, rec)  # peers reach it there
    assert {rec["host"] for rec in found.values()} == set(cluster_bed.NODES)
    return found


def test_slurm_sbatch_runs_one_agent_per_host(healthy, tmp_path):
    job_id, out = submit(healthy, "slurm.sbatch", tmp_path)
    end = wait_end(healthy, job_id, timeout=120)
    assert end["JobState"] == "COMPLETED", f"{end}\n{job_output(tmp_path, job_id)}"
    run_id = f"slurm-{job_id}"
    state = status(healthy, run_id)
    assert state["result"]["outcome"] == "succeeded", state
    assert state["spec"]["min_nodes"] == 2 and state["spec"]["max_nodes"] == 3, state["spec"]  # NNODES_MIN: N-1
    found = check_one_round_on_every_host(out, run_id)
    assert {rec["env"]["TORCHELASTIC_RUN_ID"] for rec in found.values()} == {run_id}


def test_slurm_torchrun_sbatch_pins_ranks_from_slurm(healthy, tmp_path):
    job_id, out = submit(healthy, "slurm-torchrun.sbatch", tmp_path)
    end = wait_end(healthy, job_id, timeout=120)
    assert end["JobState"] == "COMPLETED", f"{end}\n{job_output(tmp_path, job_id)}"
    found = records(out)
    run_ids = {rec["env"]["TORCHELASTIC_RUN_ID"] for rec in found.values()}
    assert len(run_ids) == 1, run_ids
    run_id = run_ids.pop()
    state = status(healthy, run_id)
    assert state["result"]["outcome"] == "succeeded", state
    found = check_one_round_on_every_host(out, run_id)
    for rec in found.values():
        env = rec["env"]
        assert env["GROUP_RANK"] == env["SLURM_PROCID"], env  # --node_rank from SLURM_PROCID
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node1", "29500"), env  # the first node as master
