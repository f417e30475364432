"""Tests of etcd_agent.node.workers with real processes: a group's start and exits, the events it posts, its
stop (SIGTERM, then SIGKILL after the grace; no descendant survives) and its failure reports.

Every wait is on an event (exit callbacks, a Unix-socket mailbox the workers write to, pidfds), never a sleep.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading

import pytest

from agents import poll_until
from etcd_agent.testing.procs import gone
from etcd_agent import proctree
from etcd_agent.config import WorkerConfig
from etcd_agent.errors import ConfigError
from etcd_agent.node.api import GroupFailed, GroupSucceeded
from etcd_agent.node.workers import WorkerGroup

pytest.register_assert_rewrite("worker_groups")  # a plugin (pytest_plugins): marked before its first import
from worker_groups import (COLD_AND_WARM, GRACE_PAST_THE_TEST, TIMEOUT, WORKERS, Exits, assignment,  # noqa: E402
                           kill_quietly, rank_dir)

pytest_plugins = ("worker_groups",)  # the fixtures make_group and mailbox


# -- start and exits ---------------------------------------------------------------------------------------------


@COLD_AND_WARM
def test_start_runs_every_worker_with_its_environment(make_group, tmp_path, warm):
    out = tmp_path / "out"
    out.mkdir()
    group, exits = make_group("record_env.py", str(out), nproc=2, warm=warm)
    group.start(assignment())
    assert len(group.pids) == 2
    done = exits.wait()
    assert [(e.local_rank, e.rank, e.returncode, e.round, e.failed) for e in done] == [
        (0, 4, 0, 3, False), (1, 5, 0, 3, False)]
    assert all(name.startswith("etcd-agent-workers-wait") for name in exits.threads)
    assert not group.running
    for e in done:
        facts = json.loads((out / f"env_{e.rank}.json").read_text())
        assert facts["pid"] == e.pid and facts["pgid"] == e.pid and facts["sid"] == e.pid
        assert facts["ppid"] == os.getpid() and facts["pdeathsig"] == signal.SIGKILL
        assert facts["stdin"] == "/dev/null"
        assert facts["env"]["LOCAL_RANK"] == str(e.local_rank)
        assert facts["env"]["ETCD_AGENT_ROUND"] == "3"
        d = rank_dir(tmp_path, e.rank)
        assert facts["env"]["TORCHELASTIC_ERROR_FILE"] == str(d / "error.json")
        assert not (d / "stdout.log").exists()  # stdout went to the console, as under torchrun
        assert (d / "stderr.log").read_text() == ""


def test_exit_code_and_signal_are_reported(make_group):
    group, exits = make_group("exit_code.py", "3")
    group.start(assignment())
    (ex,) = exits.wait()
    assert (ex.returncode, ex.failed, ex.signal_name, ex.describe()) == (3, True, None, "exit code 3")
    group.stop("next case")
    group, exits = make_group("exit_code.py", "SIGKILL")
    group.start(assignment(round=4))
    (ex,) = exits.wait()
    assert (ex.returncode, ex.signal_name, ex.describe(), ex.round) == (-9, "SIGKILL", "signal SIGKILL", 4)


def test_start_refuses_while_workers_run_and_restarts_after_stop(make_group, mailbox):
    group, exits = make_group("hang.py", n_exits=2)
    group.start(assignment(round=1))
    mailbox.ready(1)
    with pytest.raises(RuntimeError, match="stop"):
        group.start(assignment(round=2))
    group.stop("new round")
    group.start(assignment(round=2))
    mailbox.ready(1)
    group.stop("done")
    assert [e.round for e in exits.wait()] == [1, 2]


# -- the group's events (node.api) ---------------------------------------------------------------------------------

def test_workers_that_all_exit_0_make_one_success(make_group):
    group, exits = make_group("exit_code.py", "0", nproc=2)
    group.start(assignment())
    exits.wait()
    group.stop("the round is over")
    assert exits.posted() == [GroupSucceeded(3)]


def test_the_first_failure_is_the_groups_and_a_later_one_is_said_once(make_group, caplog):
    group, exits = make_group("exit_code.py", "3", nproc=2)
    with caplog.at_level(logging.WARNING, logger="etcd_agent.node.workers"):
        group.start(assignment())
        exits.wait()
        group.stop("the round is over")
    (failed,) = exits.posted()
    assert isinstance(failed, GroupFailed) and failed.round == 3
    r = failed.report
    assert (r.exitcode, r.node, r.round, r.hang) == (3, "node-a", 3, False) and r.rank in (4, 5)
    assert "the worker exited with exit code 3" in r.message
    other, pids = 9 - r.rank, {e.rank: e.pid for e in exits.items}  # ranks 4 and 5
    assert [m for m in caplog.messages if "failed too" in m] == [
        f"[run1 node-a r3] worker rank {other} (pid {pids[other]}) failed too, with "
        "exit code 3"]


def test_the_workers_a_stop_ends_make_no_event(make_group, mailbox):
    group, exits = make_group("hang.py", nproc=2, stop_timeout=TIMEOUT)
    group.start(assignment())
    mailbox.ready(2)
    group.stop("another node failed")
    assert [e.returncode for e in exits.wait()] == [-signal.SIGTERM] * 2
    assert exits.posted() == []


def test_a_failure_just_before_a_stop_keeps_its_report(make_group):
    """The worker fails on its own; its waiter has not told the group yet when a stop (for another reason) begins:
    the failure ended before the stop's first signal, so it is still the group's."""
    group, exits = make_group("exit_code.py", "3", stop_timeout=TIMEOUT)
    reaped, release = threading.Event(), threading.Event()
    report = group._report

    def held(w, returncode):  # the worker is reaped; its waiter waits here until the stop has begun
        reaped.set()
        release.wait(TIMEOUT)
        report(w, returncode)
    group._report = held
    group.start(assignment())
    assert reaped.wait(TIMEOUT)
    stopping = threading.Thread(target=group.stop, args=("another node failed",))
    stopping.start()
    poll_until(lambda: group.state.value == "stopping", TIMEOUT, "the stop begun")
    release.set()
    stopping.join(TIMEOUT)
    (failed,) = exits.posted()
    assert isinstance(failed, GroupFailed) and failed.report.exitcode == 3


def test_a_worker_that_makes_no_progress_fails_the_group_from_the_group(make_group, mailbox):
    """--worker-timeout is the group's own check: a worker that never beats (hang.py) fails the group with a hang
    report, with no agent polling it; the hung worker runs until the group is stopped, and its stop is no second
    failure."""
    group, exits = make_group("hang.py", stop_timeout=TIMEOUT, worker_timeout=0.5)
    group.start(assignment())
    mailbox.ready(1)
    failed = exits.events.get(timeout=TIMEOUT)
    assert isinstance(failed, GroupFailed) and failed.round == 3
    r = failed.report
    assert (r.hang, r.exitcode, r.signal, r.rank, r.node) == (True, None, None, 4, "node-a")
    assert "(--worker-timeout 0.5); the worker is considered hung" in r.message
    assert group.running and exits.items == []
    group.stop("the group hung")
    assert [e.returncode for e in exits.wait()] == [-signal.SIGTERM]
    assert exits.posted() == []


# -- stop --------------------------------------------------------------------------------------------------------


@COLD_AND_WARM
def test_stop_ends_workers_with_sigterm(make_group, mailbox, warm):
    group, exits = make_group("hang.py", nproc=2, stop_timeout=GRACE_PAST_THE_TEST, warm=warm)
    group.start(assignment())
    assert sorted(pid for pid, _ in mailbox.ready(2)) == sorted(group.pids)
    assert group.running
    group.stop("test")  # returns once the workers are gone, not after the grace
    assert [e.returncode for e in exits.wait()] == [-signal.SIGTERM, -signal.SIGTERM]
    assert not group.running
    group.stop("again")  # idempotent
    assert len(exits.items) == 2


@COLD_AND_WARM
def test_stop_kills_workers_that_ignore_sigterm_after_the_grace(make_group, mailbox, warm):
    """The order, as the worker tells it: SIGTERM first, which it survives (it says so), then SIGKILL."""
    group, exits = make_group("hang.py", "--ignore-term", "--note-term", stop_timeout=0.5, warm=warm)
    group.start(assignment())
    ((pid, _),) = mailbox.ready(1)
    group.stop("test")
    (ex,) = exits.wait()
    assert ex.signal_name == "SIGKILL"
    assert mailbox.get() == ["term", str(pid)], "the worker was killed without a SIGTERM first"


def test_a_fencing_stop_brings_a_slower_stops_sigkill_forward(make_group, mailbox):
    """The main thread stops the group with a grace longer than the test may run; the keepalive thread, fencing,
    stops it with 0.5 s while the first stop still waits: the worker (which ignores SIGTERM) is SIGKILLed at the
    fence's deadline, and both calls return, long before the first one's grace."""
    from etcd_agent.node.workers import GroupState

    group, exits = make_group("hang.py", "--ignore-term", stop_timeout=GRACE_PAST_THE_TEST)
    group.start(assignment())
    mailbox.ready(1)
    slow = threading.Thread(target=group.stop, args=("a new round",), daemon=True)
    slow.start()
    poll_until(lambda: group.state is GroupState.STOPPING, TIMEOUT, "the first stop under way")
    fence = threading.Thread(target=group.stop, args=("self-fencing",), kwargs={"grace": 0.5}, daemon=True)
    fence.start()
    fence.join(TIMEOUT)
    slow.join(TIMEOUT)
    assert not fence.is_alive() and not slow.is_alive()  # with the first grace kept, both would still wait
    (ex,) = exits.wait()
    assert ex.signal_name == "SIGKILL" and group.state is GroupState.STOPPED


def test_the_group_moves_through_its_states_only_forward(make_group, mailbox):
    from etcd_agent.node.workers import GroupState

    group, _exits = make_group("hang.py", stop_timeout=5)
    assert group.state is GroupState.IDLE
    group.stop("nothing runs")  # a stop before any start changes nothing
    assert group.state is GroupState.IDLE
    group.start(assignment())
    assert group.state is GroupState.RUNNING
    with pytest.raises(RuntimeError, match="stop"):
        group.start(assignment())
    group.stop("test")
    assert group.state is GroupState.STOPPED
    group.stop("again")  # idempotent
    assert group.state is GroupState.STOPPED


@COLD_AND_WARM
@pytest.mark.parametrize("scan", ["proc", "psutil"])
def test_no_descendant_survives_stop(make_group, mailbox, monkeypatch, warm, scan):
    """Found by one pass over /proc, or by psutil alone where /proc cannot be read."""
    if scan == "psutil":
        monkeypatch.setattr(proctree, "_proc_table", lambda: None)
    group, exits = make_group("spawn_child.py", stop_timeout=0.5, warm=warm)
    group.start(assignment())
    (worker,) = group.pids
    kids = [pid for pid, ppid in mailbox.ready(2) if ppid == worker]
    try:
        assert len(kids) == 2
        group.stop("test")
        exits.wait()
        assert gone(worker)
        assert [pid for pid in kids if not gone(pid)] == []
    finally:
        kill_quietly(kids)


# -- failure reports ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, message", [("record", "RuntimeError: boom"), ("plain", "plain message")])
def test_failure_report_reads_the_error_file(make_group, tmp_path, kind, message):
    group, exits = make_group("write_error_file.py", kind, nproc=2)
    group.start(assignment())
    ex = exits.wait()[1]
    report = group.failure_report(ex).to_json()
    assert json.loads(json.dumps(report)) == report
    d = rank_dir(tmp_path, 5)
    assert report == {
        "rank": 5, "local_rank": 1, "pid": ex.pid, "exitcode": 1, "signal": None, "message": message,
        "error_file": str(d / "error.json"), "stderr_tail": "Traceback (most recent call last):\nRuntimeError: boom",
        "time": ex.time, "round": 3, "node": "node-a", "hang": False, "lost": False,
    }


def test_failure_report_says_when_the_error_file_is_malformed(make_group):
    group, exits = make_group("write_error_file.py", "bad")
    group.start(assignment())
    report = group.failure_report(exits.wait()[0]).to_json()
    assert "not valid JSON" in report["message"] and "exit code 1" in report["message"]


@COLD_AND_WARM
def test_failure_report_falls_back_to_the_stderr_tail(make_group, tmp_path, warm):
    group, exits = make_group("exit_code.py", "SIGKILL", warm=warm)
    group.start(assignment())
    report = group.failure_report(exits.wait()[0]).to_json()
    assert report["signal"] == "SIGKILL" and report["exitcode"] == -9
    tail = report["stderr_tail"].splitlines()
    assert len(tail) == 20 and tail[0] == "stderr line 11" and tail[-1] == "about to end with SIGKILL"
    assert "no error file" in report["message"] and "signal SIGKILL" in report["message"]
    assert report["message"].endswith("about to end with SIGKILL")
    assert not os.path.exists(report["error_file"])


def test_a_stale_error_file_is_removed_before_start(make_group, tmp_path):
    d = rank_dir(tmp_path, 4)
    d.mkdir(parents=True)
    (d / "error.json").write_text(json.dumps({"message": "from an earlier attempt"}))
    group, exits = make_group("exit_code.py", "2")
    group.start(assignment())
    assert "earlier" not in group.failure_report(exits.wait()[0]).to_json()["message"]


def test_an_unwritable_log_dir_fails_start_before_any_worker_runs(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cfg = WorkerConfig(entrypoint=str(WORKERS / "hang.py"), args=(), nproc=2, log_dir=str(blocker))
    exits = Exits(1)
    group = WorkerGroup(cfg, on_exit=exits, node_id="node-a")
    with pytest.raises(ConfigError, match="--log-dir"):
        group.start(assignment())
    assert group.pids == [] and not group.running and exits.items == []
    group.stop("nothing to stop")


def test_one_wording_for_an_exit_code_or_a_signal():
    from etcd_agent.proctree import describe_exit

    assert describe_exit(3) == "exit code 3" and describe_exit(0) == "exit code 0"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(-40) == "signal SIG40"  # a real-time signal has no name: still said, never a ValueError
