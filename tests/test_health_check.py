"""The health gate's decisions over injected readings (coord/decide.py) and its command check (health.py): exit
codes, a timeout that kills what the check started, a program that is missing or cannot run, and bad flags refused
naming the flag."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import pytest

from agents import start_agents
from etcd_agent.config import HealthConfig
from etcd_agent.node import health
from etcd_agent.errors import ConfigError
from etcd_agent.coord.decide import Bump, CheckHealth, ClosePlan, JoinRound, Params, Wait, decide
from etcd_agent.coord.mirror import JOINING
from etcd_agent.schema.values import NodeInfo
from etcd_agent.testing import procs
from etcd_agent.testing import records as record_files
from views import ME, NOW, PARAMS, jn, me, mk_plan, running_here, view


def sick(v, node: str, why: str = "GPU 0 has 2 uncorrectable ECC error(s)"):
    return dataclasses.replace(v, nodes={**v.nodes, node: NodeInfo(node, health=why)})


# --- decisions -------------------------------------------------------------------------------------------------

def test_an_unhealthy_node_waits_for_its_next_check_then_tries_to_join():
    v = view(phase=JOINING, nodes=[ME, "node-b"], joins=[jn("node-b", 12)])
    waiting = decide(v, me(unhealthy="bad GPU", health_retry_at=NOW + 5), PARAMS)
    assert isinstance(waiting, Wait) and waiting.deadline == NOW + 5 and "unhealthy (bad GPU)" in waiting.why
    assert isinstance(decide(v, me(unhealthy="bad GPU", health_retry_at=NOW), PARAMS), JoinRound)
    assert isinstance(decide(v, me(), PARAMS), JoinRound)


def test_an_unhealthy_node_outside_a_running_round_checks_again_when_due():
    v = view(nodes=[ME, "node-b"], plan=mk_plan(3, ["node-b"]), joins=["node-b"])
    waiting = decide(v, me(unhealthy="bad GPU", health_retry_at=NOW + 5), PARAMS)
    assert isinstance(waiting, Wait) and waiting.deadline == NOW + 5
    assert isinstance(decide(v, me(unhealthy="bad GPU", health_retry_at=NOW), PARAMS), CheckHealth)
    assert isinstance(decide(v, me(), PARAMS), Wait)  # healthy: it waits to be taken into the next round


def test_the_fast_path_does_not_wait_for_an_unhealthy_node():
    p = Params(2, 4, 3, 30.0, 60.0, 1.0)
    v = view(phase=JOINING, nodes=[ME, "node-b", "node-c"], joins=[jn(ME, 11), jn("node-b", 12)],
             last_plan=mk_plan(2, [ME, "node-b", "node-c"]))
    assert isinstance(decide(v, me(round_seen_at=NOW, min_reached_at=NOW), p), Wait)  # node-c may still come
    action = decide(sick(v, "node-c"), me(round_seen_at=NOW, min_reached_at=NOW), p)
    assert isinstance(action, ClosePlan) and action.plan.nodes == [ME, "node-b"]


def test_an_unhealthy_newcomer_does_not_scale_the_job_up_and_a_healthy_one_does():
    v = view(nodes=[ME, "node-b", "node-new"], plan=mk_plan(3, [ME, "node-b"]))
    later = running_here(now=NOW + 10, newcomers_since=NOW)
    assert isinstance(decide(v, later, PARAMS), Bump)
    assert isinstance(decide(sick(v, "node-new"), later, PARAMS), Wait)


def test_a_join_timeout_names_the_unhealthy_node_and_why():
    v = sick(view(phase=JOINING, nodes=[ME, "node-b"], joins=[jn(ME, 11)]), "node-b", "no GPU")
    action = decide(v, me(round_seen_at=NOW - 60.0), PARAMS)
    assert "missing: node-b (unhealthy: no GPU)" in action.result.reason


def test_backoff_grows_to_a_minute():
    assert [health.backoff(n) for n in (1, 2, 3, 4, 5, 9)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


# --- the command ------------------------------------------------------------------------------------------------

def cmd(text: str, timeout: float = 10.0) -> HealthConfig:
    return health.parse(text, timeout, None)


def test_a_command_that_exits_0_is_healthy():
    assert health.check(cmd("true")) == ""
    assert not HealthConfig().active and cmd("true").active


def test_a_failing_command_says_its_exit_code_and_first_line():
    script = f"{sys.executable} -c \"print(); print('ECC errors on GPU 3'); print('more'); raise SystemExit(4)\""
    assert health.check(cmd(script)).endswith("failed with exit code 4: ECC errors on GPU 3")


def test_a_command_past_its_timeout_is_unhealthy_and_killed_with_what_it_started(tmp_path):
    """The check command starts a child that would live a minute, then hangs: at its timeout the whole process
    group goes, the child with it (a wait on the child's end, bounded, instead of sleeping past its lifetime)."""
    pidfile = tmp_path / "child.pid"
    # the sleeps are the child and the hang the test is about (they outlive the timeout), not waits
    problem = health.check(cmd(f"sh -c 'sleep 60 & echo $! > {pidfile}; exec sleep 30'", timeout=1.0))
    assert "did not finish within 1 s (--health-check-timeout)" in problem
    child = procs.processes([int(pidfile.read_text())])  # the file is there: the child did start
    procs.gone_within(child, 60, "child of the check")


class RecordedPopen(subprocess.Popen):
    """A Popen that records each wait on its output: (the timeout asked, whether it ran out)."""
    waits: list[tuple[float | None, bool]] = []

    def communicate(self, *args, timeout=None, **kwargs):
        try:
            got = super().communicate(*args, timeout=timeout, **kwargs)
        except subprocess.TimeoutExpired:
            self.waits.append((timeout, True))
            raise
        self.waits.append((timeout, False))
        return got


def test_a_check_whose_output_an_escaped_process_holds_is_a_timeout_within_the_limit(tmp_path, monkeypatch):
    """The command exits 0 at once, but a process it started in a session of its own (beyond the kill of the
    command's process group) keeps its output open: the check ends at its limit (plus a short drain), a timeout
    that says why, instead of blocking on the output until that process ends. The waits on the output are
    recorded: the whole limit, run out, then the drain, run out; never one without a limit."""
    pidfile = tmp_path / "escaped.pid"
    script = f"sh -c 'setsid sh -c \"echo \\$\\$ > {pidfile}; exec sleep 60\" & echo ok'"  # sleep: it lives on
    monkeypatch.setattr(health.subprocess, "Popen", RecordedPopen)
    RecordedPopen.waits = []
    try:
        problem = health.check(cmd(script, timeout=1.0))
    finally:
        pid = int(record_files.wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10,
                                          "the escaped process's pid", tmp_path))
        escaped_alive = not procs.gone(pid)  # the order that matters: the check returned while it still ran
        os.kill(pid, signal.SIGKILL)
    assert problem.endswith("did not finish within 1 s (--health-check-timeout): a process it started still holds "
                            "its output (it left the check's process group, so it was not killed)"), problem
    assert escaped_alive, "the check waited for the escaped process to end"
    assert RecordedPopen.waits == [(1.0, True), (health.DRAIN, True)], "the check gave up before its limit"


def test_a_check_that_exits_0_while_its_child_holds_the_output_is_a_timeout_and_the_child_is_killed(tmp_path):
    pidfile = tmp_path / "child.pid"  # its sleep 60: a child that outlives the check, not a wait
    problem = health.check(cmd(f"sh -c 'sh -c \"echo \\$\\$ > {pidfile}; exec sleep 60\" & echo ok'", timeout=1.0))
    assert problem.endswith("did not finish within 1 s (--health-check-timeout): it exited, but a process it "
                            "started held its output open until it was killed"), problem
    procs.gone_within(procs.processes([int(pidfile.read_text())]), 60, "child of the check")


def test_a_command_that_cannot_run_is_unhealthy(tmp_path):
    """A program that was there at start and is gone when the check runs: unhealthy, saying why."""
    gone = HealthConfig((str(tmp_path / "removed-check"),), 5.0)
    assert "could not run: No such file or directory" in health.check(gone)


@pytest.mark.parametrize("text, problem", [
    ("/no/such/health-check --quick", "the program '/no/such/health-check' is not an executable file"),
    ("no-such-health-check-program", "the program 'no-such-health-check-program' is not found on PATH"),
])
def test_a_check_program_that_is_not_there_is_refused_at_start(text, problem):
    with pytest.raises(ConfigError, match=f"--health-check '{text}': {problem}"):
        cmd(text)


def test_an_agent_whose_check_program_is_missing_exits_2_naming_the_flag(etcd_endpoint, run_id, tmp_path):
    agents, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, [], nproc=1,
                             extra=["--health-check", "/no/such/health-check"])
    assert agents[0].wait(30) == 2
    assert "--health-check '/no/such/health-check': the program '/no/such/health-check' is not an executable " \
           "file" in agents[0].stderr()


@pytest.mark.parametrize("text, timeout, problem", [
    ("", 5.0, "--health-check is empty"), ("check 'unclosed", 5.0, "--health-check"),
    ("true", 0.0, "--health-check-timeout must be positive"),
])
def test_bad_health_flags_name_the_flag(text, timeout, problem):
    with pytest.raises(ConfigError, match=problem):
        health.parse(text, timeout, None)


def test_the_flags_reach_the_agent_config(tmp_path):
    from etcd_agent.cli.main import build_parser
    from etcd_agent.cli.launch import resolve

    script = tmp_path / "train.py"
    script.write_text("")
    parser = build_parser()
    ns = parser.parse_args(["--health-check", "true -q", "--health-check-timeout", "7", str(script)])
    cfg = resolve(parser, ns).cfg
    assert cfg.health == HealthConfig(("true", "-q"), 7.0, None)
