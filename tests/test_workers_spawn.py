"""How a worker is started: a script, a module or a program without Python, one that cannot start, and the
parent-death signal (setpriv or a preexec_fn) that ends a worker with its agent, with its environment passed
unchanged either way."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

import pytest

from etcd_agent.testing.procs import gone
from etcd_agent import config
from etcd_agent.node import spawn
from etcd_agent.node.env import worker_env

pytest.register_assert_rewrite("worker_groups")  # a plugin (pytest_plugins): marked before its first import
from worker_groups import COLD_AND_WARM, REPO, TIMEOUT, WORKERS, assignment, kill_quietly  # noqa: E402

pytest_plugins = ("worker_groups",)  # the fixtures make_group and mailbox


# -- commands ----------------------------------------------------------------------------------------------


@COLD_AND_WARM
def test_module_entrypoint(make_group, tmp_path, monkeypatch, warm):
    monkeypatch.setenv("PYTHONPATH", str(WORKERS))
    out = tmp_path / "out"
    out.mkdir()
    group, exits = make_group("record_env", str(out), module=True, warm=warm)
    group.start(assignment())
    assert exits.wait()[0].returncode == 0
    argv = json.loads((out / "env_4.json").read_text())["argv"]
    assert argv[0].endswith("record_env.py") and argv[1:] == [str(out)]


def test_no_python_entrypoint(make_group):
    group, exits = make_group("sh", "-c", 'exit $((RANK + 3))', no_python=True)
    group.start(assignment())
    assert exits.wait()[0].returncode == 7


def test_a_worker_that_cannot_start_is_reported_as_failed(make_group, tmp_path):
    group, exits = make_group("no-such-program-here", no_python=True, nproc=2)
    group.start(assignment())
    done = exits.wait()
    assert [(e.returncode, e.pid) for e in done] == [(127, 0), (127, 0)]
    report = group.failure_report(done[0]).to_json()
    assert "could not start 'no-such-program-here'" in report["stderr_tail"]


# -- parent death ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("armed_by", ["setpriv", "preexec"])
def test_a_worker_has_the_parent_death_signal_either_way(make_group, tmp_path, monkeypatch, armed_by):
    """setpriv arms the signal before the worker's program runs (a spawn with no preexec_fn is a vfork); where it
    cannot, a preexec_fn does. Either way the worker is the process Popen started, in its own session."""
    if armed_by == "preexec":
        monkeypatch.setattr(spawn, "_armer", [])  # as where setpriv or dash is missing
    else:
        assert spawn.pdeathsig_argv(os.getpid(), {}) is not None, "setpriv --pdeathsig or dash is not usable here"
    out = tmp_path / "out"
    out.mkdir()
    group, exits = make_group("record_env.py", str(out))
    group.start(assignment())
    (e,) = exits.wait()
    facts = json.loads((out / "env_4.json").read_text())
    assert (facts["pid"], facts["sid"], facts["ppid"], facts["pdeathsig"]) == (e.pid, e.pid, os.getpid(),
                                                                                signal.SIGKILL)
    assert facts["argv"] == [str(WORKERS / "record_env.py"), str(out)]


@pytest.mark.parametrize("pwd, odd", [("/nonexistent/stale", {}), (None, {}),
                                      ("/nonexistent/stale", {"BASH_FUNC_module%%": "() {  :\n}", "a.b": "1"}),
                                      (None, {"IFS": ":", "OPTIND": "4", "PPID": "1"})],
                         ids=["stale-pwd", "no-pwd", "odd-names", "shell-variables"])
def test_the_worker_environment_is_passed_unchanged(make_group, tmp_path, monkeypatch, pwd, odd):
    """dash sets PWD when it starts: the prefix puts it back as the worker's environment has it (torchrun passes a
    stale PWD on, and none where there is none). Names dash would drop (an exported bash function, ``a.b``) or
    variables it resets (IFS, OPTIND, PPID) make the start go the preexec way: the environment arrives either way."""
    if pwd is None:
        monkeypatch.delenv("PWD", raising=False)
    else:
        monkeypatch.setenv("PWD", pwd)
    for name, value in odd.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    out.mkdir()
    group, exits = make_group("record_env.py", str(out))
    group.start(assignment())
    exits.wait()
    env = json.loads((out / "env_4.json").read_text())["env"]
    assert env.get("PWD") == pwd
    expected = worker_env(group.cfg, assignment(), 0, config.worker_base_env(), env["TORCHELASTIC_ERROR_FILE"])
    assert {k: v for k, v in env.items() if k != "ETCD_AGENT_PROGRESS_FILE"} == expected


def test_the_setpriv_prefix_runs_nothing_when_the_parent_is_not_the_one_named(tmp_path):
    """An agent that died before setpriv armed the signal leaves a child whose parent is no longer the agent: the
    prefix exits 1 and never runs the worker's program."""
    marker = tmp_path / "ran"
    prefix = spawn.pdeathsig_argv(os.getpid() + 1_000_000, {})  # not this test's pid: as if reparented
    assert prefix is not None
    done = subprocess.run([*prefix, "touch", str(marker)], env={}, timeout=TIMEOUT)
    assert done.returncode == 1 and not marker.exists()
    ran = subprocess.run([*spawn.pdeathsig_argv(os.getpid(), {}), "/usr/bin/touch", str(marker)], env={},
                         timeout=TIMEOUT)
    assert ran.returncode == 0 and marker.exists()


@pytest.mark.chaos
def test_a_worker_dies_with_its_agent(mailbox, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    agent = subprocess.Popen([sys.executable, str(WORKERS / "parent_agent.py"), str(tmp_path / "logs")], env=env)
    worker = 0
    try:
        ((worker, parent),) = mailbox.ready(1)
        assert parent == agent.pid
        pidfd = os.pidfd_open(worker)
        agent.kill()
        agent.wait(TIMEOUT)
        readable, _, _ = select.select([pidfd], [], [], TIMEOUT)
        os.close(pidfd)
        assert readable, f"worker {worker} outlived its agent"
        assert gone(worker)
    finally:
        agent.kill()
        agent.wait(TIMEOUT)
        kill_quietly([worker] if worker else [])
