"""The scheduler hook on the Slurm bed: deploy/slurm.sbatch with ``--quarantine-after 1 --on-quarantine
deploy/slurm-drain-hook.sh``, and a worker that fails on node3 only (the cheapest quarantine: one failure).

What must hold: node3's agent quarantines its node after round 1's failure and runs the hook once, which drains
node3 in Slurm (``sinfo`` shows it drained or draining, with etcd-agent's reason); round 2 runs on node1 and node2;
the job then finishes succeeded. node3 is resumed after the test.
"""

from __future__ import annotations

import subprocess

import pytest

from etcd_agent.testing import records

from . import history
from .slurm import DEPLOY, NPROC, WORKER, job_output, status, submit, wait_end

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

FAILING_WORKER = """import os, socket, sys
if socket.gethostname() == "node3":
    print("node3's worker fails: a bad node", file=sys.stderr)
    sys.exit(5)
os.execv(sys.executable, [sys.executable, {worker!r}, *sys.argv[1:]])
"""


@pytest.fixture
def resumable(healthy):
    """The bed, given back with node3 resumed (undrained) and idle after the test."""
    yield healthy
    subprocess.run(["scontrol", "update", "NodeName=node3", "State=RESUME"], env=healthy.env(), capture_output=True,
                   stdin=subprocess.DEVNULL, timeout=120)
    healthy.wait_nodes("IDLE", timeout=60)


def sinfo_state(bed, node: str) -> tuple[str, str]:
    """``sinfo``'s state of ``node`` (drain, drng, idle, ...) and its reason."""
    done = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%t|%E"], env=bed.env(), capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0, done.stderr
    state, _, reason = done.stdout.strip().splitlines()[0].partition("|")  # a line per partition: the same
    return state, reason


def test_a_quarantined_node_is_drained_in_slurm(resumable, tmp_path):
    bed, stop = resumable, tmp_path / "stop"
    worker = tmp_path / "failing_worker.py"
    worker.write_text(FAILING_WORKER.format(worker=str(WORKER)))
    hook = DEPLOY / "slurm-drain-hook.sh"
    job_id, out = submit(bed, "slurm.sbatch", tmp_path, "--until", str(stop), worker=worker,
                         agent_args=("--quarantine-after", "1", "--on-quarantine", str(hook)))
    run_id = f"slurm-{job_id}"
    try:
        second = history.wait_round(out, 2, 2 * NPROC, timeout=90)
        assert {r["host"] for (n, _), r in second.items() if n == 2} == {"node1", "node2"}, second
        # the hook runs off the agent's loop; the agent logs its end, in the job's output file
        records.wait_until(lambda: "ran for the quarantine of node3" in job_output(tmp_path, job_id), 60,
                           "the hook's end in the job's output", tmp_path)
        state, reason = sinfo_state(bed, "node3")
        assert state in ("drain", "drng") and reason.startswith("etcd-agent: 1 worker failure(s)"), (state, reason)
        stop.touch()
        end = wait_end(bed, job_id, timeout=120)
    finally:
        stop.touch()
        subprocess.run(["scancel", job_id], env=bed.env(), capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    output = job_output(tmp_path, job_id)
    assert end["JobState"] == "COMPLETED", f"{end}\n{output}"
    assert output.count("ran for the quarantine of node3") == 1, output
    assert sinfo_state(bed, "node3")[0] == "drain"  # the job left the node: drained, not draining
    result = status(bed, run_id)["result"]
    assert result["outcome"] == "succeeded" and result["round"] == 2, result
    print(f"node3 drained by the hook: {sinfo_state(bed, 'node3')}")

