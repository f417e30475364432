"""One log format, text or JSON: every agent line says run, node and round (logs.py); a job's lines are few, its
failure is logged once; every message starts lower-case without a final period. The worker log tree is private and
never followed through a symlink the agent did not make (logtree.py)."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from agents import JOB, CommandLine, agent_lines, job_keys, keys_of, start_agents, wait_all

from etcd_agent import logs
from etcd_agent.config import StdSpec, WorkerConfig
from etcd_agent.errors import ConfigError
from etcd_agent.node.api import Assignment
from etcd_agent.node.workers import WorkerGroup

STAMP = re.compile(r"^\[(\S+) (\S+)(?: r(\d+))?\] ")
PACKAGE = Path(__file__).resolve().parents[1] / "etcd_agent"


def test_every_line_of_a_job_with_a_crash_says_run_node_and_round_and_the_failure_is_logged_once(
        etcd_endpoint, run_id, tmp_path):
    agents, _out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--fail-rank", "3"],
                                extra=["--max-restarts", "1"])
    assert wait_all(agents) == [0, 0], [a.stderr()[-2000:] for a in agents]
    errors = {}
    for a in agents:
        lines = agent_lines(a.stderr())
        assert len(lines) > 5
        stamped = [(level, STAMP.match(msg), msg) for level, msg in lines]
        # from the agent's start-up line to its exit, every line carries the stamp
        first = next(i for i, (_lvl, m, _msg) in enumerate(stamped) if m)
        assert stamped[first][2].startswith(f"[{run_id} {a.node}] etcd-agent ")
        unstamped = [msg for _lvl, m, msg in stamped[first:] if not m]
        assert unstamped == [], unstamped
        for _lvl, m, _msg in stamped[first:]:
            assert m.group(1) == run_id and m.group(2) == a.node
        about = [(lvl, msg) for lvl, m, msg in stamped if "worker rank 3" in msg and "exit code 3" in msg]
        errors[a.node] = [msg for lvl, msg in about if lvl == "E"]
        # the restart the failure caused is its own line; no other warning repeats the failure
        assert [msg for lvl, msg in about if lvl == "W" and "restarting the job" not in msg] == []
    # the failure once, as an ERROR of the node it happened on, in the round it happened in
    keys = job_keys(etcd_endpoint, run_id)
    failed_on = [n for n in errors if keys_of(run_id).failure(1, n) in keys]
    assert len(failed_on) == 1, errors
    assert sum(map(len, errors.values())) == 1 and len(errors[failed_on[0]]) == 1, errors
    assert errors[failed_on[0]][0].startswith(f"[{run_id} {failed_on[0]} r1] worker rank 3 (pid ")


def test_a_line_about_an_earlier_round_says_that_round(caplog):
    where = logs.Where("job1", "node-a")
    log = logs.get("etcd_agent.test", where)
    with caplog.at_level(logging.INFO, logger="etcd_agent.test"):
        log.info("before any round")
        where.round = 4
        log.info("now in %s", "round 4")
        log.info("a worker of round 3 exited", round=3)
    assert [r.getMessage() for r in caplog.records] == [
        "[job1 node-a] before any round", "[job1 node-a r4] now in round 4",
        "[job1 node-a r3] a worker of round 3 exited"]


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
        "no agent yet", "[job1 node-a] one agent", "two agents: which one is not known"]


def _formatted(fmt: str, emit) -> list[str]:
    """The lines ``emit(log)`` writes through the one handler of ``--log-format fmt``."""
    stream, logger = io.StringIO(), logging.getLogger("etcd_agent.test.format")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        emit(logs.get(logger.name))
    finally:
        logger.removeHandler(handler)
    return stream.getvalue().splitlines()


def _lines(log: logs.Log) -> None:
    where = logs.Where("a1b2c3d4", "node-1")
    log.warning("before %s", "the agent")
    log.bound(where).info("registered", event="state", fields={"state": "rendezvous"})
    where.round = 2
    log.bound(where).error("worker rank %d failed", 3, event="worker_failed")
    try:
        raise ValueError("boom")
    except ValueError:
        log.bound(where).exception("a callback failed", round=1)


def test_the_text_format_is_the_time_of_day_a_level_letter_and_a_short_stamp():
    lines = _formatted("text", _lines)
    time_ = r"\d\d:\d\d:\d\d\.\d{3}"
    assert re.fullmatch(rf"{time_} W before the agent", lines[0]), lines
    assert re.fullmatch(rf"{time_} I \[a1b2c3d4 node-1\] registered", lines[1]), lines
    assert re.fullmatch(rf"{time_} E \[a1b2c3d4 node-1 r2\] worker rank 3 failed", lines[2]), lines
    assert re.fullmatch(rf"{time_} E \[a1b2c3d4 node-1 r1\] a callback failed", lines[3]), lines
    assert lines[4] == "Traceback (most recent call last):" and lines[-1] == "ValueError: boom"


def test_the_json_format_is_one_object_per_line_with_the_stamp_as_fields():
    lines = _formatted("json", _lines)
    assert len(lines) == 4, lines
    first, registered, failed, callback = map(json.loads, lines)
    iso = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"
    assert all(re.fullmatch(iso, o["time"]) for o in (first, registered, failed, callback))
    assert {k: v for k, v in first.items() if k != "time"} == {
        "level": "WARNING", "logger": "etcd_agent.test.format", "message": "before the agent"}
    assert {k: v for k, v in registered.items() if k != "time"} == {
        "level": "INFO", "logger": "etcd_agent.test.format", "run": "a1b2c3d4", "node": "node-1", "event": "state",
        "message": "registered", "state": "rendezvous"}  # no round before the first one
    assert (failed["level"], failed["round"], failed["event"], failed["message"]) == (
        "ERROR", 2, "worker_failed", "worker rank 3 failed")
    assert callback["round"] == 1 and callback["exception"].endswith("ValueError: boom")


def test_log_format_is_a_flag_and_a_variable_of_every_command(monkeypatch):
    from etcd_agent.cli import flags

    assert flags.build_parser().parse_args(["x.py"]).log_format == "text"
    assert flags.build_parser().parse_args(["--log-format", "json", "x.py"]).log_format == "json"
    monkeypatch.setenv("ETCD_AGENT_LOG_FORMAT", "json")
    assert flags.build_parser().parse_args(["x.py"]).log_format == "json"
    assert flags.subcommand_parser("status").parse_args([]).log_format == "json"
    with pytest.raises(ConfigError, match="invalid choice: 'yaml'"):
        flags.build_parser().parse_args(["--log-format", "yaml", "x.py"])


# Where a message may start with a capital: a first word that is an acronym (NVML, GPU).
ACRONYM = re.compile(r"[A-Z][A-Z0-9]+\b")
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


def _log_calls() -> list[tuple[str, int, str]]:
    """(file, line, the format string's literal start and end) of every logging call in the package whose format
    is a literal: a call of a logging method on something named like a logger (log, self._log, logger)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LOG_METHODS and "log" in ast.unparse(node.func.value).lower()):
                continue
            args = node.args[1:] if node.func.attr == "log" else node.args
            if not args:
                continue
            fmt = args[0]
            if isinstance(fmt, ast.Constant) and isinstance(fmt.value, str):
                text = fmt.value
            elif isinstance(fmt, ast.JoinedStr):  # an f-string: its literal ends, "{}" for what is formatted
                text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in fmt.values)
            else:
                continue
            found.append((str(path.relative_to(PACKAGE.parent)), node.lineno, text))
    return found


def test_every_log_message_starts_lower_case_and_has_no_final_period():
    calls = _log_calls()
    assert len(calls) > 100  # the scan sees the package's logging calls
    capital = [c for c in calls if c[2][:1].isupper() and not ACRONYM.match(c[2])]
    period = [c for c in calls if c[2].rstrip().endswith(".") and not c[2].rstrip().endswith("..")]
    assert capital == [] and period == [], capital + period


def _one_node_job(tmp_path: Path, *flags: str, fail: bool = True) -> subprocess.CompletedProcess:
    """A demo-like job: one node, two workers of job.py on the embedded etcd, their output to files only; with
    ``fail`` rank 1 fails in round 1."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "etcd_agent", "--nproc-per-node", "2", "--redirects", "3",
                           "--stop-timeout", "3", "--log-dir", str(tmp_path / "logs"), *flags, JOB, str(out),
                           *(["--fail-rank", "1"] if fail else [])], capture_output=True, text=True, timeout=60)


# The most lines at INFO and above a one-node job logs: the start-up line, registered, joined and closed round 1,
# running, the workers finished, the job ended (7); a restart adds the failure, the restart, the stop, back to
# rendezvous, joined and closed round 2, running again (7 more). One more per round: a slow machine may have the
# agent say once what a round waits for.
QUIET_JOB, ONE_RESTART = 7 + 1, 14 + 2


@pytest.mark.timeout(120)
def test_a_one_node_job_logs_a_few_short_lines_and_its_failure_once(tmp_path):
    (tmp_path / "quiet").mkdir()
    quiet = _one_node_job(tmp_path / "quiet", fail=False)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    lines = quiet.stderr.splitlines()
    assert [level for level, _msg in agent_lines(quiet.stderr)] == ["I"] * len(lines), lines
    assert len(lines) <= QUIET_JOB, lines
    run_id = STAMP.match(agent_lines(quiet.stderr)[0][1]).group(1)
    assert re.fullmatch(r"[0-9a-f]{8}", run_id)  # a short generated run id
    assert agent_lines(quiet.stderr)[-1][1].endswith("running -> finished: job succeeded in round 1 after 0 restart(s)")

    restarted = _one_node_job(tmp_path, "--max-restarts", "1")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    lines = agent_lines(restarted.stderr)
    assert len(lines) == len(restarted.stderr.splitlines()) <= ONE_RESTART, restarted.stderr
    said = [(level, msg) for level, msg in lines if "rank 1 fails in round 1" in msg]
    assert len(said) == 1 and said[0][0] == "E" and "worker rank 1 (pid " in said[0][1], lines
    startup = lines[0][1]
    assert re.search(r"\] etcd-agent \S+ on \d{4}-\d\d-\d\d \(UTC[+-]\d{4}\): nnodes 1, 2 workers per node, "
                     r"embedded etcd at \S+ \(data in \S+\), worker logs in ", startup), startup
    # the start-up line says the embedded etcd and the log directory; nothing else does
    assert sum("etcd at" in msg for _lvl, msg in lines) == 1
    assert sum(str(tmp_path / "logs") in msg for _lvl, msg in lines) == 1


@pytest.mark.timeout(60)
def test_log_format_json_writes_one_object_per_line_and_the_last_line_too(tmp_path):
    got = _one_node_job(tmp_path, "--log-format", "json")
    assert got.returncode == 1, got.stderr[-3000:]
    objects = [json.loads(line) for line in got.stderr.splitlines()]  # worker output went to files: all JSON
    assert all({"time", "level", "logger", "message"} <= o.keys() for o in objects), objects
    events = [o.get("event") for o in objects if o.get("event")]
    assert events[0] == "agent_started" and events[-2:] == ["job_ended", "exit"], events
    assert {"state", "round_joined", "round_closed", "worker_failed"} <= set(events), events
    run = objects[0]["run"]
    assert all(o["run"] == run and o["node"] == objects[0]["node"] for o in objects)
    assert [o["state"] for o in objects if "state" in o] == ["rendezvous", "running", "finished"]
    failed, ended, last = (next(o for o in objects if o.get("event") == e) for e in ("worker_failed", "job_ended",
                                                                                    "exit"))
    assert (failed["level"], failed["round"], failed["rank"], failed["exit"]) == ("ERROR", 1, 1, "exit code 3")
    assert (ended["outcome"], ended["message"]) == ("failed", "running -> finished: job failed in round 1")
    assert last["level"] == "ERROR" and last["exit_code"] == 1 and last["message"] == (
        f"job {run} failed: worker rank 1 on {objects[0]['node']} failed with exit code 3 in round 1: RuntimeError: "
        "rank 1 fails in round 1; the restart budget is spent (0 of 0 restarts used, --max-restarts)")
    assert sum("rank 1 fails in round 1" in o["message"] for o in objects) == 2  # the failure, the job's end


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
    assert "joined round" not in agent.stderr() and "started 1 worker" not in agent.stderr()
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
