"""Whole jobs: real agent processes on loopback against the real etcd, tiny Python workers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from agents import (ROOT, AgentProc, job_keys, keys_of, plan_nodes, records, start_agents, wait_all, wait_for_key,
                    wait_key_deleted, wait_records)
from etcd_agent.schema.keys import RunKeys

LOADED_WAIT = 120  # seconds: a bound on agents starting and commands running on a loaded machine, not what is tested

TORCHRUN_VARS = {"RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
                 "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
                 "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
                 "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCHELASTIC_ERROR_FILE"}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_job_succeeds_with_torchrun_environment(n, etcd_endpoint, run_id, tmp_path):
    agents, out = start_agents(n, etcd_endpoint, run_id, tmp_path, [])
    assert wait_all(agents) == [0] * n, [a.stderr()[-2000:] for a in agents]
    recs = records(out)
    world = 2 * n
    assert sorted(rank for _, rank in recs) == list(range(world))
    envs = [r["env"] for r in recs.values()]
    for env in envs:
        assert TORCHRUN_VARS <= env.keys()
        assert env["WORLD_SIZE"] == env["ROLE_WORLD_SIZE"] == str(world)
        assert env["GROUP_WORLD_SIZE"] == str(n) and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["ROLE_RANK"] == env["RANK"] and env["ROLE_NAME"] == "default"
        assert int(env["RANK"]) == int(env["GROUP_RANK"]) * 2 + int(env["LOCAL_RANK"])
        assert env["TORCHELASTIC_RESTART_COUNT"] == "0" and env["TORCHELASTIC_RUN_ID"] == run_id
        assert env["TORCHELASTIC_USE_AGENT_STORE"] == "False" and env["OMP_NUM_THREADS"] == "1"
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1
    keys = job_keys(etcd_endpoint, run_id)
    assert all(v["v"] == 1 for v in keys.values())
    result = keys[keys_of(run_id).result()]
    assert result["outcome"] == "succeeded" and result["round"] == 1
    assert not any("/nodes/" in k or "/join/" in k for k in keys), "leased keys outlived their agents"


def test_one_worker_failure_restarts_every_node_once(etcd_endpoint, run_id, tmp_path):
    agents, out = start_agents(3, etcd_endpoint, run_id, tmp_path, ["--fail-rank", "3", "--fail-round", "1"],
                        extra=["--max-restarts", "2"])
    assert wait_all(agents) == [0, 0, 0], [a.stderr()[-2000:] for a in agents]
    recs = records(out)
    assert {rnd for rnd, _ in recs} == {1, 2}
    second = [r["env"] for (rnd, _), r in recs.items() if rnd == 2]
    assert len(second) == 6
    assert {e["TORCHELASTIC_RESTART_COUNT"] for e in second} == {"1"}
    keys = job_keys(etcd_endpoint, run_id)
    assert keys[keys_of(run_id).restarts()]["used"] == 1
    reports = [v for k, v in keys.items() if k.startswith(keys_of(run_id).failures(1))]
    assert len(reports) == 1, "only the failing node reports; stopped workers are not failures"
    failure = reports[0]
    assert failure["rank"] == 3 and failure["exitcode"] == 3
    assert "rank 3 fails in round 1" in failure["message"]
    assert keys[keys_of(run_id).result()]["outcome"] == "succeeded"


def test_restart_budget_exhausted_fails_every_agent_with_root_cause(etcd_endpoint, run_id, tmp_path):
    agents, out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--always-fail-rank", "2"],
                        extra=["--max-restarts", "2"])
    assert wait_all(agents) == [1, 1]
    for a in agents:
        err = a.stderr()
        # the root cause named once, with what it said, in the job's last line
        assert re.search(r"\netcd-agent: error: job \S+ failed: worker rank 2 on node-\d failed with exit code 3 in "
                         r"round 3: RuntimeError: rank 2 always fails; the restart budget is spent \(2 of 2 restarts "
                         r"used, --max-restarts\)\n$", err), err[-3000:]
        assert "Traceback" not in err
    keys = job_keys(etcd_endpoint, run_id)
    result = keys[keys_of(run_id).result()]
    assert result["outcome"] == "failed" and result["round"] == 3
    assert result["root_cause"]["rank"] == 2 and result["root_cause"]["exitcode"] == 3
    assert keys[keys_of(run_id).restarts()] == {"v": 1, "used": 2, "max": 2}


def test_exit_barrier_waits_for_every_node(etcd_endpoint, run_id, tmp_path):
    hold = tmp_path / "release"
    out = tmp_path / "out"
    out.mkdir()
    fast = AgentProc(etcd_endpoint, run_id, "node-0", tmp_path, [str(out)], nnodes="2", nproc=2)
    slow = AgentProc(etcd_endpoint, run_id, "node-1", tmp_path, [str(out), "--hold", str(hold)], nnodes="2", nproc=2)
    agents = [fast, slow]
    # node-0's workers finish at once: wait for its exit key through a watch.
    wait_for_key(etcd_endpoint, keys_of(run_id).exit(1, "node-0"), timeout=LOADED_WAIT)
    assert fast.proc.poll() is None, "node-0 left before node-1 finished"
    hold.touch()
    assert wait_all(agents, LOADED_WAIT) == [0, 0]
    # The barrier, in wall time: node-0's agent exited after node-1's exit record was written (node-1's workers
    # finished), not when its own workers did.
    node1_done = job_keys(etcd_endpoint, run_id)[keys_of(run_id).exit(1, "node-1")]["time"]
    assert fast.ended_at >= node1_done, (fast.ended_at, node1_done)
    # The same, from etcd's history: node-0's registration (its lease) ended only after the job's result was
    # written, that is after node-1 finished; an agent that left at its own exit key would have gone before it.
    # The registration goes when the leaving agent's revoke lands, or a lease TTL later where the revoke timed out
    # on a loaded machine: the history is read once it is gone.
    wait_key_deleted(etcd_endpoint, keys_of(run_id).node("node-0"), LOADED_WAIT)
    history = subprocess.run([sys.executable, "-m", "etcd_agent", "events", "--etcd-endpoints", etcd_endpoint,
                              "--run-id", run_id, "--json"], capture_output=True, text=True, timeout=LOADED_WAIT)
    events = [json.loads(line) for line in history.stdout.splitlines()]
    at = {(e["event"], e.get("node")): e["revision"] for e in events}
    assert at[("node finished", "node-0")] < at[("node finished", "node-1")], events
    assert at[("node finished", "node-1")] <= at[("job ended", None)] < at[("node gone", "node-0")], events


def test_spec_mismatch_is_refused_and_leaves_the_job_alone(etcd_endpoint, run_id, tmp_path):
    release = tmp_path / "release"
    agents, out = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nnodes="1:2")
    first = agents[0]
    wait_records(out, {(1, 0)}, [first])
    other = AgentProc(etcd_endpoint, run_id, "node-x", tmp_path, [str(out)], nnodes="2:3", nproc=2)
    assert other.wait(30) == 2
    err = other.stderr()
    assert "--nnodes (minimum) is 2 here but 1 in the running job" in err and "Traceback" not in err
    assert first.proc.poll() is None
    release.touch()
    assert first.wait() == 0


@pytest.mark.parametrize("flags, message", [
    (["--nnodes", "3:2"], "--nnodes '3:2': the maximum 2 is below the minimum 3"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be at least 1"),
    (["--lease-ttl", "1"], "--lease-ttl must be at least 2"),
    (["--run-id", "bad id!"], "--run-id 'bad id!'"),
    (["--standalone"], "--standalone starts its own etcd: drop --etcd-endpoints"),
    (["--etcd-cert", "/dev/null", "--etcd-key", "/dev/null"], "--etcd-cert/--etcd-key need TLS: give --etcd-cacert"),
])
def test_bad_flags_fail_with_one_clear_line(flags, message, etcd_endpoint, tmp_path):
    import subprocess
    import sys

    base = ["--etcd-endpoints", etcd_endpoint, "--run-id", "ok"]
    proc = subprocess.run([sys.executable, "-m", "etcd_agent", *base, *flags, "train.py"], capture_output=True,
                          text=True, timeout=LOADED_WAIT)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_unreachable_endpoint_fails_with_one_clear_line(tmp_path):
    import subprocess
    import sys

    from etcd_agent.proctree import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    script = tmp_path / "train.py"
    script.write_text("")
    proc = subprocess.run([sys.executable, "-m", "etcd_agent", "--etcd-endpoints", endpoint, "--run-id", "x",
                           "--etcd-timeout", "1", "--log-level", "ERROR", str(script)],
                          capture_output=True, text=True, timeout=LOADED_WAIT)
    assert proc.returncode == 2
    assert f"--etcd-endpoints {endpoint}: cannot reach etcd" in proc.stderr and "Traceback" not in proc.stderr


def test_status_and_stop_subcommands(etcd_endpoint, run_id, tmp_path):
    import json
    import subprocess
    import sys

    release = tmp_path / "release"
    agents, out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)])
    wait_for_key(etcd_endpoint, keys_of(run_id).plan(1))
    base = [sys.executable, "-m", "etcd_agent"]
    ep = ["--etcd-endpoints", etcd_endpoint, "--run-id", run_id]
    status = subprocess.run(base + ["status", *ep, "--json"], capture_output=True, text=True, timeout=LOADED_WAIT)
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["round"]["phase"] == "running" and sorted(state["nodes"]) == ["node-0", "node-1"]
    assert state["plan"]["world_size"] == 4
    assert state["generation"] == 1 and not state["ended"] and state["earlier"] == []
    text = subprocess.run(base + ["status", *ep], capture_output=True, text=True, timeout=LOADED_WAIT).stdout
    assert f"run {run_id}, job 1 " in text and text.splitlines()[0].endswith(": running")
    assert "round 1: running" in text and "group rank 0" in text and "earlier job" not in text
    assert re.search(r"group rank 1: node-\d \([^)]*\) ranks 2-3, alive", text), text
    assert text.count(", alive") == 2 and "waiting for the next round" not in text
    stop = subprocess.run(base + ["stop", *ep, "--reason", "maintenance"], capture_output=True, text=True,
                          timeout=LOADED_WAIT)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert wait_all(agents) == [1, 1]
    assert all("stopped: maintenance" in a.stderr() for a in agents)
    result = job_keys(etcd_endpoint, run_id)[keys_of(run_id).result()]
    assert result["outcome"] == "stopped"
    again = subprocess.run(base + ["stop", *ep], capture_output=True, text=True, timeout=LOADED_WAIT)
    assert again.returncode == 1 and "already ended" in again.stdout
    missing = subprocess.run(base + ["status", "--etcd-endpoints", etcd_endpoint, "--run-id", "no-such-job"],
                             capture_output=True, text=True, timeout=LOADED_WAIT)
    assert missing.returncode == 2 and f"no job under {RunKeys(ROOT, 'no-such-job').prefix}" in missing.stderr


def _status(endpoint: str, run_id: str, *flags: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "etcd_agent", "status", "--etcd-endpoints", endpoint, "--run-id",
                           run_id, *flags], capture_output=True, text=True, timeout=LOADED_WAIT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_finished_run_id_runs_again_as_a_new_job(etcd_endpoint, run_id, tmp_path):
    import json

    first, out = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--always-fail-rank", "0"], nproc=1)
    assert wait_all(first) == [1]
    again, out = start_agents(1, etcd_endpoint, run_id, tmp_path, [], nproc=1)
    assert wait_all(again) == [0], again[0].stderr()[-3000:]
    err = again[0].stderr()
    assert f"run {run_id} ended (failed: " in err and f"as job 1; starting job 2 of run {run_id}" in err, err[-3000:]
    assert sorted(records(out)) == [(1, 0)]
    gen1, gen2 = job_keys(etcd_endpoint, run_id, gen=1), job_keys(etcd_endpoint, run_id)
    assert gen1[keys_of(run_id, 1).result()]["outcome"] == "failed", "the first job's record stays readable"
    assert gen1[keys_of(run_id, 1).result()]["root_cause"]["rank"] == 0
    assert gen2[keys_of(run_id, 2).result()]["outcome"] == "succeeded"
    assert gen2[keys_of(run_id, 2).restarts()]["used"] == 0 and gen2[keys_of(run_id, 2).plan(1)]["round"] == 1
    state = json.loads(_status(etcd_endpoint, run_id, "--json"))
    assert state["generation"] == 2 and state["ended"] and state["result"]["outcome"] == "succeeded"
    assert [(e["generation"], e["result"]["outcome"]) for e in state["earlier"]] == [(1, "failed")]
    text = _status(etcd_endpoint, run_id)
    assert f"run {run_id}, job 2 " in text and "ended, succeeded" in text
    assert "earlier job 1: failed in round 1: " in text, text
    assert re.search(r"group rank 0: node-0 \([^)]*\) rank 0$", text, re.M) and "ranks 0-0" not in text, text


def test_agents_re_running_a_finished_run_at_once_share_one_new_job(etcd_endpoint, run_id, tmp_path):
    first, out = start_agents(2, etcd_endpoint, run_id, tmp_path, [])
    assert wait_all(first) == [0, 0]
    gen1_records = records(out)
    again, out = start_agents(2, etcd_endpoint, run_id, tmp_path, [])  # the exact same command lines, together
    assert wait_all(again) == [0, 0], [a.stderr()[-3000:] for a in again]
    starters = [a.node for a in again if f"starting job 2 of run {run_id}" in a.stderr()]
    assert len(starters) == 1, f"exactly one agent starts the new job, not {starters}"
    recs = records(out)
    assert sorted(recs) == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert {r["pid"] for r in recs.values()}.isdisjoint(r["pid"] for r in gen1_records.values())
    keys = job_keys(etcd_endpoint, run_id)
    assert keys[keys_of(run_id, 2).result()]["outcome"] == "succeeded"
    assert sorted(plan_nodes(keys, keys_of(run_id, 2).plan(1))) == ["node-0", "node-1"]
    assert job_keys(etcd_endpoint, run_id, gen=1)[keys_of(run_id, 1).result()]["outcome"] == "succeeded"
    assert not job_keys(etcd_endpoint, run_id, gen=3), "no third job was started"


def test_duplicate_node_id_is_refused(etcd_endpoint, run_id, tmp_path):
    release = tmp_path / "release"
    agents, out = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nnodes="1:2")
    wait_for_key(etcd_endpoint, keys_of(run_id).plan(1))
    twin = AgentProc(etcd_endpoint, run_id, "node-0", tmp_path, [str(out)], nnodes="1:2", nproc=2)
    assert twin.wait(30) == 2
    assert "--node-id node-0 is already registered by a live agent" in twin.stderr()
    release.touch()
    assert agents[0].wait() == 0


def test_bad_data_under_the_prefix_is_named_and_leaves_the_job_running(etcd_endpoint, run_id, tmp_path, etcdctl):
    from agents import wait_logged

    release = tmp_path / "release"
    agents, out = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nnodes="1")
    wait_records(out, {(1, 0), (1, 1)}, agents)
    key = keys_of(run_id).round()
    good = etcdctl("get", key, "--print-value-only").stdout.strip()
    etcdctl("put", key, "this is not json")
    wait_logged(agents[0], f"bad data in etcd key {key}: not JSON", 15)
    assert agents[0].proc.poll() is None, "an agent must not give up its workers over a bad key"
    etcdctl("put", key, good)
    release.touch()
    assert agents[0].wait() == 0


def test_standalone_runs_a_job_on_a_private_etcd_and_removes_it(tmp_path):
    import subprocess
    import sys

    import psutil

    from agents import JOB

    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "etcd_agent", "--standalone", "--nproc-per-node", "2",
                           "--log-dir", str(tmp_path / "logs"), JOB, str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(records(out)) == [(1, 0), (1, 1)]
    data_dir = re.search(r"embedded etcd at \S+ \(data in ([^)\s]+)\)", proc.stderr).group(1)
    assert not os.path.exists(data_dir), "the private etcd's data directory outlived the agent"
    assert not [p for p in psutil.process_iter(["cmdline"]) if data_dir in " ".join(p.info["cmdline"] or [])]


def test_a_round_that_cannot_form_says_what_it_waits_for(etcd_endpoint, run_id, tmp_path):
    """--nnodes larger than the nodes that come: the agent logs what the round waits for (and when it times out)
    instead of staying silent until --join-timeout, then fails naming the timeout."""
    agent = AgentProc(etcd_endpoint, run_id, "node-0", tmp_path, [str(tmp_path)], nnodes="1000",
                      extra=["--join-timeout", "1"])
    assert agent.wait(60) == 1
    err = agent.stderr()
    assert "waiting: round 1 has 1 of 1000 node(s); joined: node-0 (1 of --nnodes 1000); 999 more needed; no other " \
           "node registered; the round times out in " in err
    assert "rendezvous timed out: 1 of at least 1000 node(s) joined round 1 within 1 s (--join-timeout)" in err


def test_status_without_a_run_id_lists_the_runs(etcd_endpoint, run_id, tmp_path):
    import json
    import subprocess
    import sys

    root = f"/list-{run_id}"
    (tmp_path / "a").mkdir()
    done = start_agents(1, etcd_endpoint, "finished", tmp_path / "a", [], nproc=1, extra=["--etcd-prefix", root])[0]
    assert wait_all(done) == [0]
    release = tmp_path / "release"
    running, out = start_agents(2, etcd_endpoint, "running", tmp_path, ["--run-until", str(release)], nproc=1,
                                extra=["--etcd-prefix", root])
    wait_records(out, {(1, 0), (1, 1)}, running)
    base = [sys.executable, "-m", "etcd_agent", "status", "--etcd-endpoints", etcd_endpoint, "--etcd-prefix", root]
    listed = json.loads(subprocess.run(base + ["--json"], capture_output=True, text=True, timeout=LOADED_WAIT).stdout)
    assert [(e["run_id"], e["job"], e["phase"], e["round"], e["nodes_alive"]) for e in listed] == [
        ("finished", 1, "done", 1, 0), ("running", 1, "running", 1, 2)]
    assert listed[0]["result"]["outcome"] == "succeeded" and listed[1]["result"] is None
    text = subprocess.run(base, capture_output=True, text=True, timeout=LOADED_WAIT).stdout.splitlines()
    assert text[0].split() == ["RUN", "JOB", "PHASE", "ROUND", "NODES", "RESULT"]
    assert text[1].split()[:6] == ["finished", "1", "done", "1", "0", "succeeded:"]
    assert text[2].split() == ["running", "1", "running", "1", "2", "-"]
    release.touch()
    assert wait_all(running) == [0, 0]
