"""deploy/slurm.sbatch and deploy/slurm-torchrun.sbatch, run unchanged by Slurm on the 3-node bed.

Each test submits the recipe with `sbatch --nodes=3 --gpus-per-node=0` and the environment a user gives it (PATH
with the project's install, ETCD_AGENT_ENDPOINTS for the bed's 3-member etcd, NPROC_PER_NODE=2), waits for the
Slurm job to end, then checks etcd (the job succeeded, one plan of node1..node3) and the workers' records (ranks
0..5, two on each host, each host seen by its own workers under its own name).
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

import bed as cluster_bed
import slurm
from agents import job_keys

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

DEPLOY = slurm.ROOT / "deploy"
WORKER = Path(__file__).resolve().parent / "worker.py"
NPROC = 2


def submit(bed, recipe: str, tmp_path: Path, *worker_args: str, **env: str) -> tuple[str, Path]:
    out = tmp_path / "out"
    out.mkdir()
    env = bed.env(ETCD_AGENT_ENDPOINTS=cluster_bed.etcd_endpoints(), NPROC_PER_NODE=str(NPROC),
                  LOG_DIR=str(tmp_path / "logs"), **env)
    job_id = slurm.sbatch(bed, [f"--nodes={len(cluster_bed.NODES)}", "--gpus-per-node=0",
                                f"--output={tmp_path}/slurm-%j.out", str(DEPLOY / recipe), str(WORKER), str(out),
                                *worker_args], env)
    return job_id, out


def job_output(tmp_path: Path, job_id: str) -> str:
    path = tmp_path / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else "(no output file)"


def records(out: Path) -> dict[tuple[int, int], dict]:
    """(round, rank) -> what worker.py recorded."""
    found = {}
    for path in out.glob("*.json"):
        rnd, rank = path.stem.split("-")
        found[(int(rnd), int(rank))] = json.loads(path.read_text())
    return found


def status(run_id: str) -> dict:
    done = subprocess.run(["etcd-agent", "status", "--run-id", run_id, "--json"],
                          env=cluster_bed.Bed().env(ETCD_AGENT_ENDPOINTS=cluster_bed.etcd_endpoints()),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 0, f"etcd-agent status --run-id {run_id}: {done.stderr.strip()}"
    return json.loads(done.stdout)


def check_one_round_on_every_host(out: Path, run_id: str) -> dict[tuple[int, int], dict]:
    """Round 1 only, ranks 0..5, two on each host, under that host's name; one plan in etcd, whose member at each
    group rank is the node of that host (its id starts with the host name) at an address that is the host's own."""
    found = records(out)
    assert sorted(found) == [(1, r) for r in range(NPROC * len(cluster_bed.NODES))], sorted(found)
    keys = job_keys(cluster_bed.etcd_endpoints(), run_id)
    plans = [v for k, v in keys.items() if k.endswith("/plan")]
    assert len(plans) == 1, sorted(keys)
    members = plans[0]["members"]  # [node, nproc, addr] in group-rank order
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
    end = slurm.wait_end(healthy, job_id, timeout=120)
    assert end["JobState"] == "COMPLETED", f"{end}\n{job_output(tmp_path, job_id)}"
    run_id = f"slurm-{job_id}"
    state = status(run_id)
    assert state["result"]["outcome"] == "succeeded", state
    assert state["spec"]["min_nodes"] == 2 and state["spec"]["max_nodes"] == 3, state["spec"]  # NNODES_MIN: N-1
    found = check_one_round_on_every_host(out, run_id)
    assert {rec["env"]["TORCHELASTIC_RUN_ID"] for rec in found.values()} == {run_id}


def test_slurm_torchrun_sbatch_pins_ranks_from_slurm(healthy, tmp_path):
    job_id, out = submit(healthy, "slurm-torchrun.sbatch", tmp_path)
    end = slurm.wait_end(healthy, job_id, timeout=120)
    assert end["JobState"] == "COMPLETED", f"{end}\n{job_output(tmp_path, job_id)}"
    found = records(out)
    run_ids = {rec["env"]["TORCHELASTIC_RUN_ID"] for rec in found.values()}
    assert len(run_ids) == 1, run_ids
    run_id = run_ids.pop()
    state = status(run_id)
    assert state["result"]["outcome"] == "succeeded", state
    found = check_one_round_on_every_host(out, run_id)
    for rec in found.values():
        env = rec["env"]
        assert env["GROUP_RANK"] == env["SLURM_PROCID"], env  # --node_rank from SLURM_PROCID
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node1", "29500"), env  # the first node as master
