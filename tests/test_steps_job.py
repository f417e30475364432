"""Whole jobs with real agents and workers that report steps (``progress.beat(step)``): a restart storm with no
progress is stopped by ``--max-no-progress-restarts`` long before ``--max-restarts``, and a slow node is named a
straggler by ``status``."""

from __future__ import annotations

import json
import subprocess
import sys

from agents import WORKERS, AgentProc, job_keys, keys_of, wait_all, watch_until

STEPS = str(WORKERS / "steps.py")


def cli(endpoint: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "etcd_agent", *args, "--etcd-endpoints", endpoint],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_restart_storm_without_progress_ends_after_k_restarts_not_the_budget(etcd_endpoint, run_id, tmp_path):
    """Every round beats steps 1..5 and crashes (no checkpoint: each round starts again at step 1). Round 1 sets
    the best step; the restarts into rounds 2, 3 and 4 make no step beyond it, so round 4's crash ends the job:
    3 restarts used of 20."""
    agents = [AgentProc(etcd_endpoint, run_id, f"node-{i}", tmp_path, ["--steps", "5", "--every", "0.6"],
                        nnodes="2", entry=STEPS, extra=["--max-restarts", "20", "--max-no-progress-restarts", "3"])
              for i in range(2)]
    assert wait_all(agents, timeout=180) == [1, 1], agents[0].stderr()[-4000:]
    job = job_keys(etcd_endpoint, run_id, 1)
    k = keys_of(run_id)
    restarts, result = job[k.restarts()], job[k.result()]
    assert (restarts["used"], restarts["max"], restarts["stall_limit"], restarts["best_step"]) == (3, 20, 3, 5)
    assert restarts["stalled"] == 2  # the third is the end's: it is in the result, not counted as a restart
    assert result["outcome"] == "failed" and result["round"] == 4 and result["restarts"] == 3
    assert "3 restarts in a row made no progress beyond step 5 (--max-no-progress-restarts 3" in result["reason"]
    reports = [v for key, v in job.items() if "/failures/" in key]
    assert reports and all(r["step"] == 5 for r in reports)  # each round's report says the step it reached
    said = agents[0].stderr() + agents[1].stderr()
    assert "made no progress beyond step 5" in said
    status = cli(etcd_endpoint, "status", "--run-id", run_id)
    assert "at step 5" in status and "made no progress beyond step 5" in status
    print(status)  # the closing note quotes it


def test_status_names_the_slow_node_a_straggler(etcd_endpoint, run_id, tmp_path):
    """Two nodes at 20 steps/s and one at 5: with --straggler-threshold 0.2 the slow one is named in status (text
    and JSON), in events, and nothing is restarted for it."""
    flags = ["--straggler-threshold", "0.2"]
    agents = [AgentProc(etcd_endpoint, run_id, f"node-{i}", tmp_path, ["--rate", "5" if i == 2 else "20"],
                        nnodes="3", entry=STEPS, extra=flags) for i in range(3)]
    k = keys_of(run_id)

    def rated(keys: dict[str, bytes]):
        found = {key: json.loads(v) for key, v in keys.items()}
        return len(found) == 3 and all(p["rate"] > 0 for p in found.values()) and found
    try:
        found = watch_until(etcd_endpoint, k.progresses(), rated, 90, "three nodes published a step rate")
        state = json.loads(cli(etcd_endpoint, "status", "--run-id", run_id, "--json"))
        text = cli(etcd_endpoint, "status", "--run-id", run_id)
        events = cli(etcd_endpoint, "events", "--run-id", run_id)
    finally:
        for a in agents:
            a.kill()
    assert [s["node"] for s in state["progress"]["stragglers"]] == ["node-2"]
    assert found[k.progress("node-2")]["rate"] < found[k.progress("node-0")]["rate"]
    assert state["progress"]["nodes"] == 3 and state["progress"]["round"] == 1
    assert state["restarts"]["used"] == 0 and state["round"]["round"] == 1  # nothing restarted for it
    assert "stragglers: node-2" in text
    assert "stragglers" in events and "node-2" in events
    print(text)  # the closing note quotes it
