"""Jobs nobody runs any more end: the last agent to leave ends its job (scancel sends SIGTERM to every agent at
once), and a job whose agents were all killed is ended by the next agent of the run or by ``status``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from agents import job_keys, keys_of, poll_until, until_recorded, start_agents, wait_all

from etcd_agent.coord.abandon import ABANDONED_GRACE

TTL = ["--lease-ttl", "2"]


def registered(endpoint: str, run_id: str, gen: int = 1) -> list[str]:
    nodes = keys_of(run_id, gen).nodes()
    return [k[len(nodes):] for k in job_keys(endpoint, run_id, gen) if k.startswith(nodes)]


def result(endpoint: str, run_id: str, gen: int = 1) -> dict | None:
    return job_keys(endpoint, run_id, gen).get(keys_of(run_id, gen).result())


def status(endpoint: str, run_id: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etcd_agent", "status", "--etcd-endpoints", endpoint, "--run-id",
                           run_id, "--json"], capture_output=True, text=True, timeout=60)


def test_agents_that_all_leave_at_once_end_their_job(etcd_endpoint, run_id, tmp_path):
    """SIGTERM to every agent at once (scancel): the job ends stopped, saying that every node left."""
    release = tmp_path / "release"
    agents, out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1)
    until_recorded(out, lambda r: len(r) == 2, "both workers running", timeout=60)
    for a in agents:
        a.proc.send_signal(signal.SIGTERM)
    assert wait_all(agents) == [128 + signal.SIGTERM] * 2, [a.stderr()[-2000:] for a in agents]
    ended = result(etcd_endpoint, run_id)
    assert ended is not None and ended["outcome"] == "stopped", ended
    assert ended["reason"].startswith("every node of the job left; the last, node-") and \
        ended["reason"].endswith("received SIGTERM"), ended
    shown = json.loads(status(etcd_endpoint, run_id).stdout)
    assert shown["ended"] and not shown["nodes"]


def test_agents_stopped_one_after_the_other_end_their_job_stopped_not_failed(etcd_endpoint, run_id, tmp_path):
    """A scheduler's signals reach the nodes at slightly different times: node-1 sees node-0 leave before its own
    SIGTERM arrives. With no restart left that loss would end the job failed, blaming node-0; it waits
    LOSS_END_GRACE for this node's own signal instead, and the last to leave ends the job stopped."""
    release = tmp_path / "release"
    agents, out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1)
    until_recorded(out, lambda r: len(r) == 2, "both workers running", timeout=60)
    agents[0].proc.send_signal(signal.SIGTERM)
    assert agents[0].wait() == 128 + signal.SIGTERM  # its lease is revoked: node-1 sees it lost
    agents[1].proc.send_signal(signal.SIGTERM)
    assert agents[1].wait() == 128 + signal.SIGTERM, agents[1].stderr()[-2000:]
    ended = result(etcd_endpoint, run_id)
    assert ended is not None and ended["outcome"] == "stopped", ended
    assert ended["reason"].startswith("every node of the job left; the last, node-1"), ended


def test_one_agent_leaving_does_not_end_a_job_that_goes_on(etcd_endpoint, run_id, tmp_path):
    release = tmp_path / "release"
    agents, out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                               nnodes="1:2", extra=["--max-restarts", "2"])
    until_recorded(out, lambda r: len(r) == 2, "both workers running", timeout=60)
    agents[1].proc.send_signal(signal.SIGTERM)
    assert agents[1].wait() == 128 + signal.SIGTERM
    assert result(etcd_endpoint, run_id) is None  # node-0 is still registered: the job goes on
    until_recorded(out, lambda r: (2, 0) in r, "node-0 running round 2 alone", timeout=60)
    release.touch()
    assert agents[0].wait() == 0, agents[0].stderr()[-2000:]
    assert result(etcd_endpoint, run_id)["outcome"] == "succeeded"


def killed_job(endpoint: str, run_id: str, tmp_path, n: int):
    """``n`` agents (lease TTL 2 s) run their workers until ``release`` exists; then every agent is SIGKILLed (the
    workers follow: parent-death signal) and their leases end by themselves. Returns ``release``."""
    release = tmp_path / "release"
    agents, out = start_agents(n, endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1, extra=TTL)
    until_recorded(out, lambda r: len(r) == n, "the workers running", timeout=60)
    for a in agents:
        a.kill()
    poll_until(lambda: not registered(endpoint, run_id), 30, "every lease ended", interval=0.2)
    assert result(endpoint, run_id) is None  # nobody could end it
    return release


@pytest.mark.chaos
def test_the_next_agent_ends_a_job_whose_agents_were_killed_and_starts_the_next(etcd_endpoint, run_id, tmp_path):
    release = killed_job(etcd_endpoint, run_id, tmp_path, 2)
    release.touch()
    again, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                            nnodes="1", extra=TTL)
    assert again[0].wait(ABANDONED_GRACE + 60) == 0, again[0].stderr()[-3000:]
    err = again[0].stderr()
    assert "waiting up to 15 s for one before ending the job as abandoned" in err, err[-3000:]
    ended = result(etcd_endpoint, run_id)
    assert ended["outcome"] == "stopped" and ended["reason"].startswith("abandoned: no node of the job"), ended
    assert result(etcd_endpoint, run_id, gen=2)["outcome"] == "succeeded"


@pytest.mark.chaos
def test_status_ends_a_job_whose_agents_were_killed(etcd_endpoint, run_id, tmp_path):
    killed_job(etcd_endpoint, run_id, tmp_path, 1)
    shown = status(etcd_endpoint, run_id)
    assert shown.returncode == 0, shown.stderr
    state = json.loads(shown.stdout)
    assert state["ended"] and state["result"]["outcome"] == "stopped", state
    assert state["result"]["reason"].startswith("abandoned:")
    assert "had no node left: it is ended now (stopped, abandoned)" in shown.stderr
