"""One log format: every agent line says run, node and round (logs.py); a worker failure is logged once. The
worker log tree is private and never followed through a symlink the agent did not make (logtree.py)."""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from pathlib import Path

import pytest
from agents import JOB, CommandLine, job_keys, keys_of, start_agents, wait_all

from etcd_agent import logs
from etcd_agent.config import StdSpec, WorkerConfig
from etcd_agent.errors import ConfigError
from etcd_agent.node.api import Assignment
from etcd_agent.node.workers import WorkerGroup

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) etcd-agent: (.*)$")
STAMP = re.compile(r"^\[run (\S+) node (\S+) round (\d+|-)\] ")


def agent_lines(stderr: str) -> list[tuple[str, str]]:
    """(level, message) of every line the agent logged (worker output is not the agent's)."""
    return [(m.group(1), m.group(2)) for m in map(LINE.match, stderr.splitlines()) if m]


def test_every_line_of_a_job_with_a_crash_says_run_node_and_round_and_the_failure_is_logged_once(
        etcd_endpoint, run_id, tmp_path):
    agents, _out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--fail-rank", "3"],
                                extra=["--max-restarts", "1"])
    assert wait_all(agents) == [0, 0], [a.stderr()[-2000:] for a in agents]
    errors = {}
    for a in agents:
        lines = agent_lines(a.stderr())
        assert len(lines) > 10
        stamped = [(level, STAMP.match(msg), msg) for level, msg in lines]
        # from the agent's first contact with etcd to its exit, every line carries the stamp
        first = next(i for i, (_lvl, m, _msg) in enumerate(stamped) if m)
        unstamped = [msg for _lvl, m, msg in stamped[first:] if not m]
        assert unstamped == [], unstamped
        for _lvl, m, _msg in stamped[first:]:
            assert m.group(1) == run_id and m.group(2) == a.node
        about = [(lvl, msg) for lvl, m, msg in stamped if "worker rank 3" in msg and "exit code 3" in msg]
        errors[a.node] = [msg for lvl, msg in about if lvl == "ERROR"]
        # the restart the failure caused is its own line; no other warning repeats the failure
        assert [msg for lvl, msg in about if lvl == "WARNING" and "restarting the job" not in msg] == []
        assert not any("Run " in msg for _lvl, msg in lines)  # the old second format is gone
    # the failure once, as an ERROR of the node it happened on, in the round it happened in
    keys = job_keys(etcd_endpoint, run_id)
    failed_on = [n for n in errors if keys_of(run_id).failure(1, n) in keys]
    assert len(failed_on) == 1, errors
    assert sum(map(len, errors.values())) == 1 and len(errors[failed_on[0]]) == 1, errors
    assert errors[failed_on[0]][0].startswith(f"[run {run_id} node {failed_on[0]} round 1] worker rank 3 (pid ")


def test_a_line_about_an_earlier_round_says_that_round(caplog):
    where = logs.Where("job1", "node-a")
    log = logs.get("etcd_agent.test", where)
    with caplog.at_level(logging.INFO, logger="etcd_agent.test"):
        log.info("before any round")
        where.round = 4
        log.info("now in %s", "round 4")
        log.info("a worker of round 3 exited", round=3)
    assert [r.getMessage() for r in caplog.records] == [
        "[run job1 node node-a round -] before any round", "[run job1 node node-a round 4] now in round 4",
        "[run job1 node node-a round 3] a worker of round 3 exited"]


def test_module_lines_take_the_one_agent_of_the_process(caplog):
    plain = logs.get("etcd_agent.test")
    a, b = logs.Where("job1", "node-a"), logs.Where("job1", "node-b")
    with caplog.at_level(logging.INFO, logger="etcd_agent.test"):
        plain.info("no agent yet")
        logs.running(a)
        plain.info("one agent")
        logs.running(b)
        plain.info("two agents: which one is not known")
        logs.stopped(a)
        logs.stopped(b)
    assert [r.getMessage() for r in caplog.records] == [
        "no agent yet", "[run job1 node node-a round -] one agent", "two agents: which one is not known"]


# --- the private log tree ------------------------------------------------------------------------------------------
NOBODY = 65534  # the other local user: what it owns, the agent (root in these tests) must never write through
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="plants another user's files with chown (root only)")
SECRET = "root only\n"


def _secret(tmp_path: Path) -> Path:
    """A file only root may read or write: the target another user points the agent's log at."""
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    return secret


def _shared(tmp_path: Path) -> Path:
    """A /tmp-like --log-dir: anyone may write it, the sticky bit keeps each user's entries their own."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    return shared


def _as_nobody(path: Path, target: Path | None = None) -> Path:
    """Make ``path`` as the other user would: a directory (mode 0777), or a symlink to ``target``."""
    if target is None:
        path.mkdir(mode=0o777)
        path.chmod(0o777)
    else:
        path.symlink_to(target)
    os.lchown(path, NOBODY, NOBODY)
    return path


def _group(log_dir: Path, node: str = "n0", **kw) -> tuple[WorkerGroup, threading.Event]:
    done = threading.Event()
    cfg = WorkerConfig(entrypoint=JOB, args=(str(log_dir.parent / "out"),), nproc=1, log_dir=str(log_dir),
                       stop_timeout=3, **kw)
    (log_dir.parent / "out").mkdir(exist_ok=True)
    return WorkerGroup(cfg, on_exit=lambda ex: done.set(), node_id=node), done


def _start(group: WorkerGroup) -> None:
    group.start(Assignment("probe", 1, 0, 1, 0, 1, "127.0.0.1", 29500, 0, 0))


@needs_root
def test_another_users_stderr_log_symlink_is_refused_at_start_and_never_written(tmp_path):
    """The probe as a user runs it: another user pre-created the whole predictable path of rank 0's stderr.log in a
    shared --log-dir, the log itself a symlink to a root-only file. The root agent refuses to start, naming the run's
    directory, and the file is untouched."""
    secret, shared = _secret(tmp_path), _shared(tmp_path)
    d = _as_nobody(shared / "probe")
    for name in ("job_0001", "n0", "round_0001", "rank_0"):
        d = _as_nobody(d / name)
    _as_nobody(d / "stderr.log", secret)
    agent = CommandLine(["--standalone", "--run-id", "probe", "--node-id", "n0", "--log-dir", str(shared),
                         "--redirects", "3", JOB, str(tmp_path)], tmp_path, "n0")
    assert agent.wait(60) == 2, agent.stderr()[-3000:]
    last = agent.stderr().strip().splitlines()[-1]
    assert last == (f"etcd-agent: error: --log-dir: {shared}/probe belongs to user id {NOBODY}, not to this agent's "
                    "(0); the agent writes worker logs only into directories it made itself (remove it, or choose "
                    "another --log-dir)"), last
    assert "joined round" not in agent.stderr() and "started 1 workers" not in agent.stderr()
    assert secret.read_text() == SECRET and stat.S_IMODE(secret.stat().st_mode) == 0o600


@needs_root
def test_a_symlinked_run_directory_is_refused_and_nothing_is_made_through_it(tmp_path):
    shared = _shared(tmp_path)
    theirs = _as_nobody(tmp_path / "theirs")
    _as_nobody(shared / "probe", theirs)
    group, _done = _group(shared)
    with pytest.raises(ConfigError, match=re.escape(f"--log-dir: {shared}/probe is a symbolic link; the agent writes "
                                                    "worker logs only into directories it made itself")):
        _start(group)
    assert list(theirs.iterdir()) == [] and group.pids == []


@needs_root
@pytest.mark.parametrize("how", ["symlink", "others_may_write"])
def test_a_planted_log_in_the_agents_own_tree_is_refused(tmp_path, how):
    """Below a run directory of the agent's own: a stderr.log that is a symlink (as if planted while its directory
    was open to others), or a rank directory that others may write, is refused by name; the link is not followed."""
    secret, shared = _secret(tmp_path), _shared(tmp_path)
    rank = shared / "probe" / "job_0001" / "n0" / "round_0001" / "rank_0"
    rank.mkdir(parents=True, mode=0o700)
    if how == "symlink":
        _as_nobody(rank / "stderr.log", secret)
        why = f"{rank}/stderr.log is a symbolic link"
    else:
        rank.chmod(0o777)
        why = f"{rank} may be written by other users (mode 0777)"
    group, _done = _group(shared)
    with pytest.raises(ConfigError, match=re.escape(f"--log-dir: {why};")):
        _start(group)
    assert secret.read_text() == SECRET and group.pids == []


def test_a_log_dir_anyone_may_write_needs_the_sticky_bit(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    group, _done = _group(open_dir)
    with pytest.raises(ConfigError, match=re.escape(f"--log-dir: {open_dir} may be written by any user and has no "
                                                    "sticky bit (mode 0777)")):
        _start(group)
    assert list(open_dir.iterdir()) == []


def test_the_log_tree_is_private_whatever_the_umask(tmp_path):
    """In a shared, sticky --log-dir every directory the agent makes is 0700 and every log file 0600, also with a
    umask of 0 (the modes are the agent's, not the umask's luck)."""
    shared = _shared(tmp_path)
    group, done = _group(shared, redirects=StdSpec(3), duplicate_stdout_filters=("x",))
    old = os.umask(0)
    try:
        _start(group)
    finally:
        os.umask(old)
    try:
        assert done.wait(30), "the worker did not exit"
    finally:
        group.stop("test over")
    run = shared / "probe"
    dirs = [run, *(p for p in run.rglob("*") if p.is_dir())]
    files = [p for p in run.rglob("*.log")]
    assert len(dirs) == 5 and {p.name for p in files} == {"stdout.log", "stderr.log", "filtered_stdout.log"}
    assert {str(p.relative_to(shared)): stat.S_IMODE(p.stat().st_mode) for p in dirs} == {
        str(p.relative_to(shared)): 0o700 for p in dirs}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}
