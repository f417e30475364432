"""Slurm's clients against the bed: submit a batch job, read a job's state, wait for its end.

Jobs leave no event a client can watch (no accounting database runs in the bed), so a job's end is polled from
slurmctld with `scontrol show job`, which keeps an ended job for MinJobAge (300 s).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bed import Bed, scontrol_fields

ROOT = Path(__file__).resolve().parents[2]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE"}
POLL_S = 0.2


def sbatch(bed: Bed, args: list[str], env: dict[str, str]) -> str:
    """``sbatch --parsable ARGS`` from the repository's root; returns the job id."""
    done = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=30)
    assert done.returncode == 0, f"sbatch {' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}"
    return done.stdout.strip().split(";")[0]


def job(bed: Bed, job_id: str) -> dict[str, str]:
    """The job's fields as `scontrol -o show job` prints them (JobState, ExitCode, NodeList, Reason, ...)."""
    done = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=bed.env(), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=30)
    assert done.returncode == 0, f"scontrol show job {job_id}: {done.stderr.strip()}"
    return scontrol_fields(done.stdout)


def wait_state(bed: Bed, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
    """Wait until the job is in one of ``states`` (or has ended); returns its fields."""
    deadline = time.monotonic() + timeout
    while True:
        fields = job(bed, job_id)
        if fields["JobState"] in states or fields["JobState"] in ENDED:
            return fields
        assert time.monotonic() < deadline, f"job {job_id} not in {sorted(states)} within {timeout} s: {fields}"
        time.sleep(POLL_S)


def wait_end(bed: Bed, job_id: str, timeout: float) -> dict[str, str]:
    return wait_state(bed, job_id, ENDED, timeout)


def cancel(bed: Bed, job_id: str) -> None:
    subprocess.run(["scancel", job_id], env=bed.env(), capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
