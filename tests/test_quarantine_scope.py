"""The do-not-restart exit code, cluster-wide quarantine records, the ``etcd-agent quarantine`` command and the
``--on-quarantine`` hook: decisions as pure unit tests, the rest against a real etcd with real agents.

Every test that touches cluster records uses an ``--etcd-prefix`` of its own: cluster records live at the root,
and tests run in parallel on one etcd."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agents import AgentProc, job_keys, keys_of, start_agents, until_recorded, wait_all, wait_for_key, wait_logged
from etcd_agent.config import QuarantinePolicy
from etcd_agent.coord import quarantine
from etcd_agent.coord.decide import End, Params, decide
from etcd_agent.coord.mirror import JOINING
from etcd_agent.errors import ConfigError
from etcd_agent.node import hooks
from etcd_agent.schema.keys import Keys, cluster_quarantine
from etcd_agent.schema.values import Outcome, Quarantine, Result
from views import WALL, finished_here, report, view

CODE = 87
NO_RESTART = Params(2, 4, 3, 2.0, 60.0, 1.0, no_restart_exit_code=CODE)


def cli(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etcd_agent", "quarantine", *args, "--etcd-endpoints", endpoint],
                          capture_output=True, text=True, timeout=60)


# --- decisions -------------------------------------------------------------------------------------------------

def test_the_no_restart_exit_code_ends_the_job_with_that_worker_as_root_cause():
    failure = dataclasses.replace(report(exitcode=CODE), round=3)
    earlier = report(node="node-b", time=5.0, exitcode=1)  # a peer failed first (its collective broke)
    action = decide(view(failures={"node-b": earlier}), finished_here("failed", failure), NO_RESTART)
    assert isinstance(action, End) and action.phase == "failed" and action.failure == failure
    assert action.result.root_cause == failure and action.result.restarts == 0
    assert f"exit code {CODE} is the --no-restart-exit-code" in action.result.reason
    # another exit code restarts as before; without the flag the code is an ordinary failure
    assert not isinstance(decide(view(), finished_here("failed", report(exitcode=1)), NO_RESTART), End)
    assert not isinstance(decide(view(), finished_here("failed", failure), dataclasses.replace(
        NO_RESTART, no_restart_exit_code=None)), End)


def test_the_no_restart_exit_code_ends_the_job_even_after_a_peer_restarted_the_round():
    """A peer's failure bumped the round first: this node's exit code still ends the job, its report is not
    written again under the new round (it was written when its workers were stopped)."""
    failure = dataclasses.replace(report(exitcode=CODE), round=3)
    local = dataclasses.replace(finished_here("failed", failure), workers_running=False)
    action = decide(view(number=4, phase=JOINING, joins=["node-b"]), local, NO_RESTART)
    assert isinstance(action, End) and action.result.root_cause == failure and action.failure is None
    assert decide(view(number=4, result=Result(Outcome.FAILED, 4)), local, NO_RESTART).__class__.__name__ == "Finish"


def test_a_quarantine_begins_once_and_an_operator_record_says_who_wrote_it():
    policy = QuarantinePolicy(after=1, cooldown=50.0)
    q = quarantine.record_failure(None, "n2", WALL, policy, WALL, "run r1")
    assert quarantine.began(None, q, WALL) and q.by == "run r1" and q.until == WALL + 50.0
    again = quarantine.record_failure(q, "n2", WALL + 1, policy, WALL + 1)
    assert not quarantine.began(q, again, WALL + 1)  # sitting out already: no second hook
    op = quarantine.operator_record("n3", "", 30.0, WALL)
    assert op.by == "operator" and op.until == WALL + 30.0 and "operator" in op.reason


def test_flags_are_checked():
    with pytest.raises(ConfigError, match="--quarantine-scope must be one of job, cluster"):
        QuarantinePolicy(scope="everywhere")
    with pytest.raises(ConfigError, match="--on-quarantine-timeout must be positive"):
        QuarantinePolicy(hook_timeout=0)
    with pytest.raises(ConfigError, match="--on-quarantine is empty"):
        hooks.parse("  ")
    assert hooks.parse("drain.sh --now 'a b'") == ("drain.sh", "--now", "a b") and hooks.parse(None) == ()
    from test_cli import launch

    base = ["--nnodes", "1", "--etcd-endpoints", "127.0.0.1:1", "--run-id", "x", "train.py"]
    for flag, value, said in [("--no-restart-exit-code", "0", "expected an exit code 1-255"),
                              ("--no-restart-exit-code", "256", "recommended: 87"),
                              ("--quarantine-scope", "rack", "--quarantine-scope must be one of")]:
        with pytest.raises(ConfigError, match=said):
            launch(*base[:-1], flag, value, base[-1])


def test_the_cluster_key_lies_outside_every_run():
    keys = Keys("/etcd-agent", "quarantine", 1)
    assert keys.cluster_quarantine("n1") == cluster_quarantine("/etcd-agent", "n1") == "/etcd-agent/.quarantine/n1"
    assert not keys.cluster_quarantine("n1").startswith(keys.run.prefix)


# --- the records, against etcd ----------------------------------------------------------------------------------

def _record(endpoint: str, root: str, run: str, node: str, scope: str, log=None):
    """A node's QuarantineRecord as its agent makes it, reading (not watching) each key when asked to watch it."""
    from etcd_agent.config import EtcdConfig
    from etcd_agent.coord.mirror import Mirror
    from etcd_agent.coord.quarantine_record import QuarantineRecord
    from etcd_agent.endpoints import parse_endpoints
    from etcd_agent.etcd.client import Etcd

    etcd, keys = Etcd(EtcdConfig(parse_endpoints(endpoint))), Keys(root, run, 1)
    mirror = Mirror(keys)

    def read(key: str) -> None:
        kv, rev = etcd.get(key)
        mirror.reset_range(key, b"", [kv] if kv else [], rev)
    return etcd, QuarantineRecord(etcd, keys, node, mirror, lambda name, key, got: read(key), read, log or Log(), scope)


def test_scope_says_where_a_job_writes_and_every_job_honours_cluster_records(etcd_endpoint, run_id):
    root, policy = f"/t-{run_id}", QuarantinePolicy(after=1, cooldown=600.0, scope="cluster")
    etcd, writer = _record(etcd_endpoint, root, "a", "n1", "cluster")
    _, reader = _record(etcd_endpoint, root, "b", "n1", "job")
    try:
        writer.to_count = WALL
        problem, wait = writer.holds(policy, WALL)
        assert problem.startswith("quarantined until ") and wait == 600.0
        assert writer.began is not None and writer.began.by == "run a"
        assert etcd.get(Keys(root, "a", 1).quarantine("n1"))[0] is None  # not under the job's prefix
        # job b counts nothing (--quarantine-after 0) and still sits out for the cluster record
        problem, wait = reader.holds(QuarantinePolicy(), WALL + 10)
        assert problem.endswith("(cluster-wide)") and wait == 590.0
        assert reader.holds(QuarantinePolicy(), WALL + 600) == ("", 0.0)  # the cooldown ended
        # a garbled record: a warning naming the key (once), nobody held out
        log = Log()
        reader.log = log
        etcd.put(cluster_quarantine(root, "n1"), b'{"v": 1, "node": "n1", "until": -5}')
        assert reader.holds(QuarantinePolicy(), WALL)[0] == "" and reader.holds(QuarantinePolicy(), WALL)[0] == ""
        assert len(log.lines) == 1 and cluster_quarantine(root, "n1") in log.lines[0][1]
        # scope cluster counts on over a garbled record: its next write replaces it
        writer.to_count = WALL + 1
        assert writer.holds(policy, WALL + 1)[0].startswith("quarantined until ")
    finally:
        etcd.close()


# --- the hook --------------------------------------------------------------------------------------------------

class Log:
    def __init__(self):
        self.lines = []

    def info(self, msg, *args, **_):
        self.lines.append(("info", msg % args))

    def warning(self, msg, *args, **_):
        self.lines.append(("warning", msg % args))


def test_the_hook_gets_node_reason_and_end_and_its_failure_or_timeout_is_only_logged(tmp_path):
    q = Quarantine("node-7", (), 2_000_000_000.0, "2 worker failure(s)", "run r")
    out = tmp_path / "env.json"
    writer = (sys.executable, "-c", "import json, os, sys; json.dump({k: v for k, v in os.environ.items() "
              "if k.startswith('ETCD_AGENT_QUARANTINE_')}, open(sys.argv[1], 'w'))", str(out))
    log = Log()
    assert hooks.run(writer, 30.0, q, log) == "" and log.lines[0][0] == "info"
    assert json.loads(out.read_text()) == {"ETCD_AGENT_QUARANTINE_NODE": "node-7", "ETCD_AGENT_QUARANTINE_REASON":
                                           "2 worker failure(s)", "ETCD_AGENT_QUARANTINE_UNTIL": "2000000000",
                                           "ETCD_AGENT_QUARANTINE_UNTIL_ISO": "2033-05-18T03:33:20Z"}
    failing = (sys.executable, "-c", "import sys; print('scontrol: permission denied'); sys.exit(4)")
    assert "failed with exit code 4: scontrol: permission denied" in hooks.run(failing, 30.0, q, log)
    stuck = (sys.executable, "-c", "import time; time.sleep(600)")  # a hook that never ends: the timeout's case
    assert "did not finish within 0.5 s (--on-quarantine-timeout)" in hooks.run(stuck, 0.5, q, log)
    assert "could not run" in hooks.run((str(tmp_path / "missing"),), 5.0, q, log)
    assert [level for level, _ in log.lines] == ["info", "warning", "warning", "warning"]


# --- the command -----------------------------------------------------------------------------------------------

def test_quarantine_add_list_release(etcd_endpoint, run_id):
    root = ["--etcd-prefix", f"/t-{run_id}"]
    empty = cli(etcd_endpoint, "list", *root)
    assert empty.returncode == 0 and "no node is quarantined" in empty.stdout
    added = cli(etcd_endpoint, "add", "node-9", "--for", "600", "--reason", "bad NVLink", *root)
    assert added.returncode == 0 and "node-9 quarantined cluster-wide until " in added.stdout, added.stderr
    listed = cli(etcd_endpoint, "list", *root)
    assert listed.returncode == 0
    header, row = listed.stdout.splitlines()
    assert header.split() == ["NODE", "SCOPE", "UNTIL", "REASON"]
    assert row.split()[:2] == ["node-9", "cluster"] and row.endswith("bad NVLink (operator)")
    released = cli(etcd_endpoint, "release", "node-9", *root)
    assert released.returncode == 0 and "node-9 released" in released.stdout
    again = cli(etcd_endpoint, "release", "node-9", *root)
    assert again.returncode == 1 and "has no quarantine record" in again.stdout
    for args, said in [(["add"], "needs a NODE"), (["add", "a/b"], "NODE 'a/b'"),
                       (["add", "n1", "--for", "-1"], "--for must be positive"),
                       (["list", "--run-id", "nothing-here"], "--run-id nothing-here: no job")]:
        bad = cli(etcd_endpoint, *args, *root)
        assert bad.returncode == 2 and said in bad.stderr, (args, bad.stderr)


def test_a_garbled_cluster_record_is_named_and_holds_nobody_out(etcd_endpoint, run_id, tmp_path, etcdctl):
    prefix = f"/t-{run_id}"
    key = cluster_quarantine(prefix, "node-0")
    etcdctl("put", key, '{"v": 1, "node": "node-0", "until": "soon"}')
    listed = cli(etcd_endpoint, "list", "--etcd-prefix", prefix)
    assert listed.returncode == 0 and "not a valid record, ignored by every agent" in listed.stdout
    agents, _out = start_agents(1, etcd_endpoint, run_id, tmp_path, [], nproc=1, extra=["--etcd-prefix", prefix])
    assert wait_all(agents) == [0], agents[0].stderr()[-2000:]
    assert f"ignoring a quarantine record that is not valid: bad data in etcd key {key}: until must be" \
        in agents[0].stderr()


# --- whole jobs ------------------------------------------------------------------------------------------------

def test_a_worker_exiting_with_the_no_restart_code_ends_the_job_at_once(etcd_endpoint, run_id, tmp_path):
    """Rank 1 exits 87: both agents end the job failed in round 1, no restart spent, rank 1 named as the cause."""
    agents, _out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--fail-rank", "1", "--exit-code", str(CODE)],
                                nproc=1, extra=["--max-restarts", "3", "--no-restart-exit-code", str(CODE)])
    assert wait_all(agents) == [1, 1], [a.stderr()[-2000:] for a in agents]
    keys = job_keys(etcd_endpoint, run_id)
    result = keys[keys_of(run_id).result()]
    assert result["outcome"] == "failed" and result["round"] == 1 and result["restarts"] == 0, result
    cause = result["root_cause"]
    assert cause["rank"] == 1 and cause["exitcode"] == CODE, cause
    assert f"exit code {CODE} is the --no-restart-exit-code" in result["reason"]
    for a in agents:
        assert "restarting the job" not in a.stderr()


def test_a_cluster_quarantine_keeps_the_node_out_of_another_job(etcd_endpoint, run_id, tmp_path):
    """Job A (scope cluster) quarantines node-2 after its first failure and runs its hook once; job B, started
    on the same etcd with the default scope, runs without node-2 until an operator releases it."""
    prefix = f"/t-{run_id}"
    hook_out = tmp_path / "hook.json"
    hook = tmp_path / "hook.py"
    hook.write_text("import json, os, sys\njson.dump({'env': dict(os.environ)}, open(sys.argv[1], 'w'))\n")
    common = ["--etcd-prefix", prefix, "--last-call", "1"]
    a_extra = [*common, "--max-restarts", "3", "--quarantine-after", "1", "--quarantine-scope", "cluster",
               "--on-quarantine", f"{sys.executable} {hook} {hook_out}"]
    release = tmp_path / "release"
    good, out = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                             nnodes="1:2", extra=a_extra)
    bad, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--always-fail"], nproc=1, nnodes="1:2", first=2,
                          extra=a_extra)
    wait_logged(bad[0], "this node is unhealthy and does not join: quarantined until ", timeout=60)
    record = wait_for_key(etcd_endpoint, cluster_quarantine(prefix, "node-2"))
    assert record["by"] == f"run {run_id}" and record["until"] > 0
    wait_logged(bad[0], "ran for the quarantine of node-2", timeout=30)
    env = json.loads(hook_out.read_text())["env"]
    assert env["ETCD_AGENT_QUARANTINE_NODE"] == "node-2" and "worker failure(s)" in env["ETCD_AGENT_QUARANTINE_REASON"]
    assert env["ETCD_AGENT_QUARANTINE_UNTIL"] == f"{record['until']:.0f}"
    listed = cli(etcd_endpoint, "list", "--etcd-prefix", prefix)
    assert "node-2" in listed.stdout and "cluster" in listed.stdout

    other = f"{run_id}-b"
    b_out = tmp_path / "b"
    b_out.mkdir()
    b_release = tmp_path / "b-release"
    b_agents = [AgentProc(etcd_endpoint, other, node, tmp_path, [str(b_out), "--run-until", str(b_release)],
                          nnodes="1:2", extra=common) for node in ("node-2", "node-5")]
    wait_logged(b_agents[0], "quarantined until ", timeout=60)
    assert "(cluster-wide)" in b_agents[0].stderr()
    found = until_recorded(b_out, lambda found: found.get((1, 0)), "job B's round 1 running", b_agents, timeout=60)
    assert found["env"]["WORLD_SIZE"] == "1" and found["env"]["GROUP_RANK"] == "0"  # node-5 alone
    assert "(cluster-wide)" in wait_for_key(etcd_endpoint, Keys(prefix, other, 1).node("node-2"))["health"]
    release.touch()
    b_release.touch()
    assert wait_all(good + bad) == [0, 0], [a.stderr()[-2000:] for a in good + bad]
    assert wait_all(b_agents) == [0, 0], [a.stderr()[-2000:] for a in b_agents]
    assert bad[0].stderr().count("ran for the quarantine of node-2") == 1


def test_the_slurm_drain_hook_drains_the_node_with_the_reason(tmp_path, monkeypatch):
    """deploy/slurm-drain-hook.sh through the agent's hook runner, with a stand-in scontrol that records its
    arguments (the real one drains a node of the Slurm test bed: tests/cluster/test_quarantine_drain.py)."""
    script = Path(__file__).resolve().parents[1] / "deploy" / "slurm-drain-hook.sh"
    said = tmp_path / "scontrol.json"
    fake = tmp_path / "scontrol.py"
    fake.write_text(f"import json, sys\njson.dump(sys.argv[1:], open({str(said)!r}, 'w'))\n")
    q = Quarantine("node3", (), 2_000_000_000.0, 'a "bad" GPU', "run r")
    log = Log()
    monkeypatch.setenv("SCONTROL", f"{sys.executable} {fake}")
    assert hooks.run((str(script),), 30.0, q, log) == "", log.lines
    assert json.loads(said.read_text()) == [
        "update", "NodeName=node3", "State=DRAIN",
        "Reason=etcd-agent: a 'bad' GPU (quarantined until 2033-05-18T03:33:20Z)"]
