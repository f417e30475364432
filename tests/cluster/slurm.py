"""Slurm's clients against the bed: submit a recipe as a user would, read a job's state, wait for its end; what
the job left (the workers' records, `etcd-agent status`).

Jobs leave no event a client can watch (no accounting database runs in the bed), so a job's end is polled from
slurmctld with `scontrol show job`, which keeps an ended job for MinJobAge (300 s).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from agents import records  # noqa: F401 - the workers here write the records tests/workers/job.py does

from .bed import NODES, Bed, etcd_endpoints, scontrol_fields

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
WORKER = Path(__file__).resolve().parent / "worker.py"
BEAT_WORKER = Path(__file__).resolve().parent / "beat_worker.py"  # heartbeats, ends, and a TCP ring
NPROC = 2  # workers per node (NPROC_PER_NODE)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE"}
POLL_S = 0.2


def sbatch(bed: Bed, args: list[str], env: dict[str, str]) -> str:
    """``sbatch --parsable ARGS`` from the repository's root; returns the job id."""
    done = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0, f"sbatch {' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}"
    return done.stdout.strip().split(";")[0]


def job(bed: Bed, job_id: str) -> dict[str, str]:
    """The job's fields as `scontrol -o show job` prints them (JobState, ExitCode, NodeList, Reason, ...)."""
    done = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=bed.env(), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
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
    subprocess.run(["scancel", job_id], env=bed.env(), capture_output=True, stdin=subprocess.DEVNULL, timeout=120)


def submit(bed: Bed, recipe: str, tmp_path: Path, *worker_args: str, agent_args: tuple[str, ...] = (),
           worker: Path = WORKER, sbatch_args: tuple[str, ...] = (), **env: str) -> tuple[str, Path]:
    """``sbatch --nodes=3 --gpus-per-node=0 deploy/RECIPE AGENT_ARGS WORKER OUT WORKER_ARGS`` with the environment a
    user gives the recipe (the project's install first on PATH, the bed's etcd, NPROC_PER_NODE, LOG_DIR; ``env``
    on top). ``agent_args`` (etcd-agent's own flags, before the script: the recipe passes its arguments on after
    its flags) and ``worker`` (default worker.py) are optional. Returns the job id and OUT, where the workers leave
    their records. ``sbatch_args`` go to sbatch before the recipe (--time=5, --requeue, ...)."""
    out = tmp_path / "out"
    out.mkdir()
    env = bed.env(**{"ETCD_AGENT_ENDPOINTS": etcd_endpoints(), "NPROC_PER_NODE": str(NPROC),
                     "LOG_DIR": str(tmp_path / "logs"), **env})
    job_id = sbatch(bed, [f"--nodes={len(NODES)}", "--gpus-per-node=0", f"--output={tmp_path}/slurm-%j.out",
                          *sbatch_args, str(DEPLOY / recipe), *agent_args, str(worker), str(out), *worker_args], env)
    return job_id, out


def job_output(tmp_path: Path, job_id: str) -> str:
    """What the batch script and srun printed (the agents' logs)."""
    path = tmp_path / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else "(no output file)"


def status(bed: Bed, run_id: str, *flags: str, endpoints: str | None = None) -> dict:
    """`etcd-agent status --run-id RUN_ID --json FLAGS` against the bed's etcd (or ``endpoints``)."""
    done = subprocess.run(["etcd-agent", "status", "--run-id", run_id, "--json", *flags],
                          env=bed.env(ETCD_AGENT_ENDPOINTS=endpoints or etcd_endpoints()), capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 0, f"etcd-agent status --run-id {run_id}: {done.stderr.strip()}"
    return json.loads(done.stdout)


class LongJob:
    """A slurm.sbatch job of beat_worker.py that trains until the test calls ``finish`` (it touches the workers'
    stop file); as a context manager it is cancelled if the test leaves without finishing it."""

    def __init__(self, bed: Bed, tmp_path: Path, *worker_args: str, agent_args: tuple[str, ...] = (), **env: str):
        self.bed, self.tmp_path, self.stop = bed, tmp_path, tmp_path / "stop"
        self.job_id, self.out = submit(bed, "slurm.sbatch", tmp_path, "--until", str(self.stop), *worker_args,
                                       agent_args=agent_args, worker=BEAT_WORKER, **env)
        self.run_id = f"slurm-{self.job_id}"

    def output(self) -> str:
        return job_output(self.tmp_path, self.job_id)

    def finish(self, timeout: float = 120) -> dict[str, str]:
        """Let the workers end; returns the Slurm job's fields once it ended."""
        self.stop.touch()
        return wait_end(self.bed, self.job_id, timeout)

    def __enter__(self) -> "LongJob":
        return self

    def __exit__(self, *exc) -> None:
        self.stop.touch()
        cancel(self.bed, self.job_id)
