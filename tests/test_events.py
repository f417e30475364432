"""``etcd-agent events`` replays a job's history from etcd's revisions (and ``--follow`` streams it), against
running agents: a job with a restart and a lost node."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from agents import start_agents, wait_all, wait_records


def events(endpoint: str, run_id: str, *flags: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etcd_agent", "events", "--etcd-endpoints", endpoint, "--run-id",
                           run_id, *flags], capture_output=True, text=True, timeout=timeout)


@pytest.mark.chaos  # node-2's agent is SIGKILLed
def test_history_of_a_job_with_a_restart_and_a_lost_node(etcd_endpoint, run_id, tmp_path):
    release, crash = tmp_path / "release", tmp_path / "crash"
    agents, out = start_agents(3, etcd_endpoint, run_id, tmp_path, ["--fail-rank", "1", "--fail-when", str(crash),
                               "--run-until", str(release)], nproc=1, nnodes="2:3",
                               extra=["--max-restarts", "3", "--lease-ttl", "3"])
    wait_records(out, {(1, 0), (1, 1), (1, 2)}, agents, timeout=60)
    follow = subprocess.Popen([sys.executable, "-m", "etcd_agent", "events", "--etcd-endpoints", etcd_endpoint,
                               "--run-id", run_id, "--follow", "--json"], stdout=subprocess.PIPE, text=True)
    try:
        crash.touch()
        wait_records(out, {(2, 0), (2, 1), (2, 2)}, agents, timeout=60)
        agents[2].proc.send_signal(signal.SIGKILL)  # node-2 is lost: its lease runs out
        agents[2].proc.wait()
        wait_records(out, {(3, 0), (3, 1)}, agents[:2], timeout=60)
        release.touch()
        assert wait_all(agents[:2]) == [0, 0]
        streamed = [json.loads(x) for x in follow.communicate(timeout=30)[0].splitlines()]
    finally:
        follow.kill()
    replayed = events(etcd_endpoint, run_id, "--json")
    assert replayed.returncode == 0, replayed.stderr
    history = [json.loads(x) for x in replayed.stdout.splitlines()]
    # the stream (--follow, started mid-job) agrees with the replay, and stops at the result; the replay also has
    # what came after it (the agents' leases revoked as they exit)
    assert streamed and streamed[-1]["event"] == "result"
    assert [e["event"] for e in history][:len(streamed)] == [e["event"] for e in streamed]
    kinds = [e["event"] for e in history]
    assert kinds.count("round opened") == 3 and kinds.count("round closed") == 3
    assert any(e["event"] == "failure" and e["rank"] == 1 and e["how"] == "exit code 3" for e in history)
    assert any(e["event"] == "node gone" and e["node"] == "node-2" for e in history)
    assert any(e["event"] == "round opened" and "node-2 left round 2" in e["reason"] for e in history)
    assert [e["used"] for e in history if e["event"] == "restart counted"] == [1, 2]
    assert kinds.count("result") == 1 and kinds.count("job ended") == 1
    revisions = [e["revision"] for e in history]
    assert revisions == sorted(revisions)
    text = events(etcd_endpoint, run_id)
    assert text.returncode == 0 and "failure in round 1: rank 1 on node-" in text.stdout
    print("\n" + text.stdout)
    status = subprocess.run([sys.executable, "-m", "etcd_agent", "status", "--etcd-endpoints", etcd_endpoint,
                             "--run-id", run_id, "--json"], capture_output=True, text=True, timeout=60)
    rounds = json.loads(status.stdout)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["formed_s"] is not None and r["formed_s"] >= 0 and r["ran_s"] >= 0 for r in rounds)
    assert "node-2 left round 2" in rounds[2]["why"]
    shown = subprocess.run([sys.executable, "-m", "etcd_agent", "status", "--etcd-endpoints", etcd_endpoint,
                            "--run-id", run_id], capture_output=True, text=True, timeout=60).stdout
    assert "history, round 3: formed in " in shown and ", ran " in shown
    print(shown)
