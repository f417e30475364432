"""A node crash under Slurm: every process of node3 (slurmd, the agent, its workers) gets SIGKILL while the job
of deploy/slurm.sbatch trains on node1..node3.

What must hold: the Slurm job goes on (the recipe's --no-kill) after Slurm took node3 DOWN; the survivors run
the next round, on node1 and node2 only, once node3's lease ends (printed, not asserted); the job then finishes and
succeeded in etcd; no failure report blames a healthy node; and the invariants of history.check (one plan per
round, no worker of round 1 alive once one of round 2 started, the restart counted once, no process left).
"""

from __future__ import annotations

import time

import pytest

from . import history, slurm
from agents import wait_records

from .slurm import BEAT_WORKER, NPROC, job_output, status, submit

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]



@pytest.fixture
def crashable(healthy):
    """The bed, given back with node3 restarted and idle after the test."""
    yield healthy
    if healthy.slurmd["node3"].poll() is not None:
        healthy.start_slurmd("node3")
    healthy.wait_nodes("IDLE", timeout=60)


def test_node_crash_under_slurm(crashable, tmp_path):
    bed, stop = crashable, tmp_path / "stop"
    job_id, out = submit(bed, "slurm.sbatch", tmp_path, "--until", str(stop), worker=BEAT_WORKER)
    run_id = f"slurm-{job_id}"
    try:
        first = wait_records(out, {(1, r) for r in range(3 * NPROC)}, [], timeout=60)
        victim = "node3"
        assert sum(rec["host"] == victim for rec in first.values()) == NPROC
        crashed = time.monotonic()
        bed.crash(victim)

        wanted = {(2, r) for r in range(2 * NPROC)}
        second = wait_records(out, wanted, [], timeout=60)
        noticed = time.monotonic() - crashed
        assert {second[k]["host"] for k in wanted} == {"node1", "node2"}
        assert not any(rnd == 2 and rank >= 2 * NPROC for rnd, rank in second), sorted(second)

        bed.wait_nodes("DOWN", [victim], timeout=60)  # Slurm saw the node fail (SlurmdTimeout)
        assert slurm.job(bed, job_id)["JobState"] == "RUNNING", job_output(tmp_path, job_id)
        stop.touch()
        end = slurm.wait_end(bed, job_id, timeout=120)
    finally:
        stop.touch()
        slurm.cancel(bed, job_id)
    state = status(bed, run_id)
    assert state["result"]["outcome"] == "succeeded" and state["result"]["round"] == 2, state
    blamed = {node for reports in state["failures"].values() for node in reports}
    assert blamed <= {victim}, f"failure reports of healthy nodes: {state['failures']}"
    print(f"round 2 started {noticed:.1f} s after the crash; Slurm job {end['JobState']} {end['ExitCode']}; "
          f"failure reports {state['failures']}\n{job_output(tmp_path, job_id)}")
    assert end["JobState"] == "COMPLETED", f"{end}\n{job_output(tmp_path, job_id)}"
    checked = history.check(bed, run_id, out)
    assert checked.restarts == 1 and checked.rounds[2].counted, checked.describe()
