"""A run's ended job stays closed while any node of it is registered: an agent that comes to the run then gets that
job's end (the message and exit code its agents ended with) instead of starting a new job; once nobody of it is
registered, the same run id starts a new job. Real agents (the CLI) against the real etcd."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from agents import AgentProc, job_keys, keys_of
from etcd_agent import errors
from etcd_agent.coord import jobs, txns
from etcd_agent.config import EtcdConfig, JobSpec
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.etcd.client import Etcd
from etcd_agent.schema.keys import RunKeys
from etcd_agent.schema.values import NodeInfo

ROOT = "/etcd-agent"
SPEC = JobSpec(1, 1, "1", 0)


@pytest.fixture
def etcd(etcd_endpoint):
    client = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
    yield client
    client.close()


def error_line(agent: AgentProc) -> str:
    lines = [line for line in agent.stderr().splitlines() if line.startswith("etcd-agent: error: ")]
    assert len(lines) == 1, agent.stderr()[-3000:]
    return lines[0]


def status(endpoint: str, run_id: str) -> str:
    done = subprocess.run([sys.executable, "-m", "etcd_agent", "status", "--etcd-endpoints", endpoint, "--run-id",
                           run_id], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_newcomer_gets_the_failed_job_while_one_of_its_agents_is_still_exiting(etcd_endpoint, run_id, tmp_path):
    out, release = tmp_path / "out", tmp_path / "release"
    out.mkdir()
    once = ["--max-restarts", "0"]
    failing = AgentProc(etcd_endpoint, run_id, "node-0", tmp_path, [str(out), "--always-fail"], nnodes="2",
                        extra=once)
    # node-1's worker ignores SIGTERM: its agent stays registered, stopping it, until the test releases it
    exiting = AgentProc(etcd_endpoint, run_id, "node-1", tmp_path,
                        [str(out), "--run-until", str(release), "--ignore-sigterm"], nnodes="2",
                        extra=once + ["--stop-timeout", "300"])
    assert failing.wait(60) == 1, failing.stderr()[-3000:]
    ended = error_line(failing)
    keys = keys_of(run_id)
    state = job_keys(etcd_endpoint, run_id)
    assert state[keys.result()]["outcome"] == "failed" and keys.node("node-1") in state

    newcomer = AgentProc(etcd_endpoint, run_id, "node-2", tmp_path, [str(out)], nnodes="2", extra=once)
    assert newcomer.wait(30) == 1  # before: it started job 2 and waited there for a second node
    assert error_line(newcomer).startswith(ended + "; ")  # the same end, in the same words, as the job's own agent
    assert error_line(newcomer).endswith(  # then how to start anew
        f"node-1 of that job is still registered (an agent still exiting, or a torchrun handler not shut down): the "
        f"run id starts a new job once it has left (`etcd-agent status --run-id {run_id} --etcd-endpoints "
        f"{etcd_endpoint}` shows it), or give another --run-id")
    assert (f"job 1 of run {run_id} ended (failed) and 1 of its nodes is still registered (node-1): this agent "
            "does not start a new job") in newcomer.stderr()
    assert not job_keys(etcd_endpoint, run_id, gen=2), "no second job was started"
    text = status(etcd_endpoint, run_id)
    assert f"run {run_id}, job 1 " in text and "ended, failed" in text and "nodes alive: node-1" in text, text

    release.touch()  # node-1's worker exits, its agent leaves: nobody of job 1 is registered any more
    assert exiting.wait(60) == 1
    again = AgentProc(etcd_endpoint, run_id, "node-2", tmp_path, [str(out)], nnodes="1", extra=once)
    assert again.wait(60) == 0, again.stderr()[-3000:]
    assert f"as job 1; starting job 2 of run {run_id}" in again.stderr()
    assert job_keys(etcd_endpoint, run_id)[keys_of(run_id, 2).result()]["outcome"] == "succeeded"


def test_a_newcomer_to_a_succeeded_job_exits_0_while_a_node_of_it_is_registered(etcd, etcd_endpoint, run_id,
                                                                                 tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    first = AgentProc(etcd_endpoint, run_id, "node-0", tmp_path, [str(out)])
    assert first.wait(60) == 0, first.stderr()[-3000:]
    keys = keys_of(run_id)
    # a node of the job still registered (as an agent still in its exit is), on a lease the test holds
    lease = etcd.lease_grant(60)
    etcd.put(keys.node("node-1"), NodeInfo("node-1", lease=f"{lease:x}").encode(), lease)

    newcomer = AgentProc(etcd_endpoint, run_id, "node-2", tmp_path, [str(out)])
    assert newcomer.wait(30) == 0, newcomer.stderr()[-3000:]
    err = newcomer.stderr()
    assert f"job {run_id} already succeeded in round 1 after 0 restart(s)" in err and "error" not in err, err
    assert not job_keys(etcd_endpoint, run_id, gen=2), "no second job was started"

    etcd.lease_revoke(lease)  # the last node of job 1 is gone: the run id starts job 2
    again = AgentProc(etcd_endpoint, run_id, "node-2", tmp_path, [str(out)])
    assert again.wait(60) == 0, again.stderr()[-3000:]
    assert job_keys(etcd_endpoint, run_id)[keys_of(run_id, 2).result()]["outcome"] == "succeeded"


def test_no_new_job_starts_over_a_node_that_registered_after_the_read(etcd, run_id):
    """The registry read that found nobody guards the new job: a node of the ended job that registers in between
    (an agent of it re-opening its session) makes the newcomer read again, and get the job's end."""
    run = RunKeys(ROOT, run_id)
    keys = txns.init_job(etcd, run, SPEC, time.time())
    assert txns.close_job(etcd, keys, "stopped", "the test stopped it", time.time())
    pointer, _ = etcd.get(run.job())
    _nobody, seen = etcd.get_prefix(keys.nodes())
    lease = etcd.lease_grant(60)
    etcd.put(keys.node("n0"), NodeInfo("n0", lease=f"{lease:x}").encode(), lease)
    assert not jobs.new_generation(etcd, run, 2, pointer.mod_revision, SPEC, time.time(), seen)
    assert txns.current_job(etcd, run) == keys
    with pytest.raises(errors.JobEnded, match="stopped: the test stopped it") as ended:
        txns.init_job(etcd, run, SPEC, time.time())
    assert ended.value.registered == ["n0"] and ended.value.exit_code == 1
    etcd.lease_revoke(lease)
    etcd.put(keys.node("by-hand"), NodeInfo("by-hand").encode())  # no lease: no live agent's, it keeps nothing closed
    assert txns.init_job(etcd, run, SPEC, time.time()) == run.generation(2)


def test_a_run_id_held_by_another_job_is_refused_with_the_fix(etcd, etcd_endpoint, run_id, tmp_path):
    """A launch refused because the run id's job has another spec says how to free it; the command it names works,
    and the job's end that a newcomer then gets while a node of it is still registered says how to start anew."""
    (tmp_path / "train.py").write_text("pass\n")
    keys = txns.init_job(etcd, RunKeys(ROOT, run_id), SPEC, time.time())
    lease = etcd.lease_grant(60)  # a live agent of that job, as far as etcd knows
    etcd.put(keys.node("node-1"), NodeInfo("node-1", lease=f"{lease:x}").encode(), lease)

    def launch(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "etcd_agent", "--etcd-endpoints", etcd_endpoint, "--run-id",
                               run_id, "--node-id", "node-2", *flags, "train.py"], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)

    refused = launch("--nproc-per-node", "2")
    assert refused.returncode == 2, refused.stderr
    stop = f"etcd-agent stop --run-id {run_id} --etcd-endpoints {etcd_endpoint}"
    assert refused.stderr.splitlines()[-1] == (
        f"etcd-agent: error: this agent does not match job {run_id} ({keys.spec()}): --nproc-per-node is '2' here "
        f"but '1' in the running job; to start a new job with these flags, stop that one (`{stop}`) or give another "
        "--run-id")
    stopped = subprocess.run([sys.executable, "-m", "etcd_agent", *stop.split()[1:]], capture_output=True,
                             text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr

    newcomer = launch("--nproc-per-node", "2")  # node-1 of the stopped job is still registered
    assert newcomer.returncode == 1, newcomer.stderr
    status = f"etcd-agent status --run-id {run_id} --etcd-endpoints {etcd_endpoint}"
    assert newcomer.stderr.splitlines()[-1] == (
        f"etcd-agent: error: job {run_id} stopped: stopped by an operator; node-1 of that job is still registered "
        "(an agent still exiting, or a torchrun handler not shut down): the run id starts a new job once it has "
        f"left (`{status}` shows it), or give another --run-id")
    shown = subprocess.run([sys.executable, "-m", "etcd_agent", *status.split()[1:]], capture_output=True,
                           text=True, timeout=60)
    assert "nodes alive: node-1" in shown.stdout, shown.stdout + shown.stderr

    etcd.lease_revoke(lease)  # node-1 left: the run id starts job 2 with the new flags
    assert launch("--nproc-per-node", "2").returncode == 0
    assert txns.current_job(etcd, RunKeys(ROOT, run_id)) == keys.run.generation(2)
