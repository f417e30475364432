"""Slurm's own signals to a running deploy/slurm.sbatch job: the time limit's warning, a requeue, a preemption.

What must hold, from etcd (`etcd-agent status --json`, `events --json`), from Slurm (`scontrol show job`) and from
the nodes (no agent or worker left on any of them):

- the time limit: the recipe's `--signal=B:USR1@120` warning reaches the batch script, which runs `etcd-agent
  stop`: the job ends `stopped` with the reason `Slurm job N is at its time limit (SIGUSR1 from sbatch --signal)`
  within seconds of the warning, and Slurm ends the job (FAILED, exit code 1: the agents' exit for a stopped job)
  before its limit. The limit is shortened once the job runs (`scontrol update TimeLimit=1`), so that the warning
  comes at slurmctld's next time-limit check (every 30 s) and never before the job's first round started;
- a requeue (`scontrol requeue`, the same job id, SLURM_RESTART_COUNT=1): every agent gets SIGTERM, the last one
  ends job 1 of the run `stopped` (`every node of the job left; the last, NODE, received SIGTERM (Slurm job N)`),
  and the requeued job runs as job 2 of the same run id (slurm-N) and succeeds. What carries over: the run's result
  history (`status` lists job 1's result under `earlier`); what does not: the restarts used (job 1 spent one, job 2
  starts with none used and the whole budget, its workers see TORCHELASTIC_RESTART_COUNT=0) and the round numbers;
- a preemption (the bed's `urgent` partition, PriorityTier 2, PreemptType=preempt/partition_prio with
  PreemptMode=REQUEUE): an exclusive job there takes a node of the running job, which is requeued as above: job 1
  ends `stopped` with the SIGTERM reason, job 2 of the run runs once the urgent job is done, and succeeds.

Costs (on the 2-core test machine): about 30 s each: the time limit waits for slurmctld's time-limit check (up to
30 s), a requeued job for the bed's requeue delay (cred_expire, 10 s, plus 1) and the next scheduling pass.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from . import history
from .bed import NODES, URGENT, Bed
from .slurm import NPROC, cancel, job, job_output, records, sbatch, status, submit, wait_end

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

WORLD = NPROC * len(NODES)
WITHIN_S = 10.0  # "within seconds": loose, the machine is shared
TIME_LIMIT_REASON = "Slurm job {} is at its time limit (SIGUSR1 from sbatch --signal)"
CHECK_PERIOD_S = 30.0  # slurmctld checks time limits (and sends --signal warnings) this often


def scontrol(bed: Bed, *args: str) -> None:
    done = subprocess.run(["scontrol", *args], env=bed.env(), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0, f"scontrol {' '.join(args)}: {done.stderr.strip()}"


def wait_for(check, timeout: float, what):
    """Poll ``check`` (Slurm's and the workers' files have no event to wait on) until truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.1)
    return value


def sigterm_reason(job_id: str) -> tuple[str, str]:
    """What the last agent to leave writes, around its node's name."""
    return "every node of the job left; the last, node", f"received SIGTERM (Slurm job {job_id})"


def requeued_round(out: Path) -> dict[int, dict]:
    """Rank -> record of round 1 of the requeued job (SLURM_RESTART_COUNT=1), once every rank has one."""
    found = {rank: rec for (rnd, rank), rec in records(out).items()
             if rnd == 1 and rec["env"].get("SLURM_RESTART_COUNT") == "1"}
    return found if len(found) == WORLD else {}


def check_requeued(bed: Bed, job_id: str, out: Path, tmp_path: Path, stop: Path) -> dict:
    """The requeued job runs as job 2 of run slurm-JOB_ID after job 1 ended stopped (SIGTERM), and succeeds."""
    run_id = f"slurm-{job_id}"
    second = wait_for(lambda: requeued_round(out), 120,
                      lambda: f"the requeued job's workers: {job(bed, job_id)}\n{job_output(tmp_path, job_id)}")
    state = status(bed, run_id)
    assert state["generation"] == 2 and not state["ended"], state
    (earlier,) = state["earlier"]
    head, tail = sigterm_reason(job_id)
    assert earlier["generation"] == 1 and earlier["result"]["outcome"] == "stopped", earlier
    assert earlier["result"]["reason"].startswith(head) and earlier["result"]["reason"].endswith(tail), earlier
    assert state["restarts"] in (None, {"used": 0, "max": 3}), state["restarts"]  # a new job, a new budget
    assert {rec["host"] for rec in second.values()} == set(NODES), second
    for rec in second.values():
        env = rec["env"]
        assert env["TORCHELASTIC_RUN_ID"] == run_id and env["SLURM_JOB_ID"] == job_id, env
        assert env["TORCHELASTIC_RESTART_COUNT"] == "0", env
    stop.touch()
    end = wait_end(bed, job_id, timeout=60)
    output = job_output(tmp_path, job_id)
    assert end["JobState"] == "COMPLETED" and end["Restarts"] == "1", f"{end}\n{output}"
    assert f"runs as {run_id} (SLURM_RESTART_COUNT=1)" in output, output
    history.wait_no_orphans()
    state = status(bed, run_id)
    assert state["generation"] == 2 and state["result"]["outcome"] == "succeeded", state
    assert state["earlier"] == [earlier], state["earlier"]  # job 1's result stays in the run's history
    ended = [e for e in history.events(bed, run_id) if e["event"] == "result"]
    assert [e["outcome"] for e in ended] == ["succeeded"], ended  # events: the current job's history only
    return state


def test_time_limit_warning_stops_the_job(healthy, tmp_path):
    bed, stop = healthy, tmp_path / "stop"
    job_id, out = submit(bed, "slurm.sbatch", tmp_path, "--until", str(stop), sbatch_args=("--time=5",))
    run_id, reason = f"slurm-{job_id}", TIME_LIMIT_REASON.format(job_id)
    try:
        history.wait_round(out, 1, WORLD, timeout=60)
        scontrol(bed, "update", f"JobId={job_id}", "TimeLimit=1")  # its end: a minute after its start
        shortened = time.time()
        wait_for(lambda: "is at its time limit" in job_output(tmp_path, job_id), CHECK_PERIOD_S + WITHIN_S,
                 lambda: f"no time-limit warning: {job(bed, job_id)}\n{job_output(tmp_path, job_id)}")
        warned = time.time()
        end = wait_end(bed, job_id, timeout=60)
        ended = time.time()
    finally:
        stop.touch()
        cancel(bed, job_id)
    output = job_output(tmp_path, job_id)
    # Slurm: the job ended by itself (the agents exit 1 for a stopped job) before its limit, never TIMEOUT
    assert (end["JobState"], end["ExitCode"]) == ("FAILED", "1:0"), f"{end}\n{output}"
    assert f"job {run_id} (job 1 of the run) stopped: every agent stops its workers and exits" in output, output
    history.wait_no_orphans()
    state = status(bed, run_id)
    result = state["result"]
    assert result["outcome"] == "stopped" and result["reason"] == reason, result
    assert not state["nodes"], state["nodes"]
    events = history.events(bed, run_id)
    assert [(e["outcome"], e["reason"]) for e in events if e["event"] == "result"] == [("stopped", reason)], events
    print(f"time limit: the warning came {warned - shortened:.1f} s after the limit was shortened; etcd said "
          f"stopped ({reason!r}) {result['time'] - warned:+.1f} s after it; Slurm ended the job "
          f"{ended - warned:.1f} s after it ({end['JobState']} {end['ExitCode']})")


def test_requeue_runs_the_next_job_of_the_run(healthy, tmp_path):
    bed, stop = healthy, tmp_path / "stop"
    job_id, out = submit(bed, "slurm.sbatch", tmp_path, "--until", str(stop), sbatch_args=("--requeue",))
    run_id = f"slurm-{job_id}"
    try:
        first = history.of_round(history.wait_round(out, 1, WORLD, timeout=60), 1)
        assert {rec["env"]["SLURM_RESTART_COUNT"] for rec in first.values()} <= {None, "0"}, first
        os.kill(first[WORLD - 1]["pid"], signal.SIGKILL)  # job 1 spends a restart
        history.wait_round(out, 2, WORLD, timeout=30)
        assert status(bed, run_id)["restarts"]["used"] == 1
        requeued = time.time()
        scontrol(bed, "requeue", job_id)
        state = check_requeued(bed, job_id, out, tmp_path, stop)
    finally:
        stop.touch()
        cancel(bed, job_id)
    print(f"requeue: job 1 of {run_id} {state['earlier'][0]['result']['reason']!r} "
          f"{state['earlier'][0]['result']['time'] - requeued:+.1f} s after `scontrol requeue`; job 2 "
          f"{state['result']['outcome']}, restarts {state['restarts']}")


def test_preemption_requeues_the_job(healthy, tmp_path):
    bed, stop = healthy, tmp_path / "stop"
    job_id, out = submit(bed, "slurm.sbatch", tmp_path, "--until", str(stop), sbatch_args=("--requeue",))
    urgent = None
    try:
        history.wait_round(out, 1, WORLD, timeout=60)
        preempted = time.time()
        urgent = sbatch(bed, ["--partition", URGENT, "--nodes=1", "--nodelist=node3", "--exclusive",
                              f"--output={tmp_path}/urgent-%j.out", "--wrap", "hostname"], bed.env())
        state = check_requeued(bed, job_id, out, tmp_path, stop)
        urgent_end = wait_end(bed, urgent, timeout=30)
    finally:
        stop.touch()
        cancel(bed, job_id)
        if urgent:
            cancel(bed, urgent)
    assert urgent_end["JobState"] == "COMPLETED", urgent_end
    assert (tmp_path / f"urgent-{urgent}.out").read_text().strip() == "node3"
    print(f"preemption: job 1 of slurm-{job_id} {state['earlier'][0]['result']['reason']!r} "
          f"{state['earlier'][0]['result']['time'] - preempted:+.1f} s after the urgent job's sbatch; job 2 "
          f"{state['result']['outcome']}")
