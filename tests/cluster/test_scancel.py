"""scancel of a running deploy/slurm.sbatch job: Slurm sends SIGTERM to every agent at once.

What must hold: the Slurm job ends CANCELLED; no agent or worker is left on any node; and etcd says the job ended
(a result, no live node), so that `etcd-agent status` does not show a cancelled job running.
"""

from __future__ import annotations

import time

import pytest

from agents import until_recorded

from . import slurm
from .bed import NODES
from .history import left_on
from .slurm import NPROC, job_output, status, submit

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def test_scancel_ends_the_job_everywhere(healthy, tmp_path):
    bed, stop = healthy, tmp_path / "stop"
    job_id, out = submit(bed, "slurm.sbatch", tmp_path, "--until", str(stop))
    try:
        try:
            until_recorded(out, lambda found: len(found) >= len(NODES) * NPROC, "round 1 to start", timeout=60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {job_output(tmp_path, job_id)}") from None
        slurm.cancel(bed, job_id)
        end = slurm.wait_end(bed, job_id, timeout=60)
    finally:
        stop.touch()
    assert end["JobState"] == "CANCELLED", f"{end}\n{job_output(tmp_path, job_id)}"
    deadline = time.monotonic() + 30
    while leftovers := {h: cmds for h in NODES if (cmds := left_on(h))}:
        assert time.monotonic() < deadline, f"left running after scancel: {leftovers}"
        time.sleep(0.05)  # slurmstepd ends the tasks' processes after the job's end

    state = status(bed, f"slurm-{job_id}")
    assert state["result"] is not None, f"the cancelled job has no result in etcd: {state}"
    reason = state["result"]["reason"]
    assert state["result"]["outcome"] == "stopped", state["result"]
    # the last agent to leave ended it, saying why and which Slurm job it was
    assert reason.startswith("every node of the job left; the last, node") and "received SIGTERM" in reason and \
        f"(Slurm job {job_id})" in reason, reason
    assert not state["nodes"], state["nodes"]
