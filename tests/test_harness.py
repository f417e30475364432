"""The test harness's own waits (etcd_agent.testing.records and .procs): each wakes on its event, and each still
works where the event is missing (inotify unavailable: the slow fallback)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import psutil
import pytest

from etcd_agent.testing import procs, records


def later(seconds: float, action) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


def test_write_is_atomic_and_load_reads_every_record_in_name_order(tmp_path):
    records.write(tmp_path / "2-0.json", {"n": 2})
    records.write(tmp_path / "1-1.json", {"n": 1})
    (tmp_path / "3-0.json.tmp").write_text("{half")  # a writer that died mid-write: not a record
    assert records.load(tmp_path) == [{"n": 1}, {"n": 2}]
    assert records.by_round_rank(tmp_path) == {(1, 1): {"n": 1}, (2, 0): {"n": 2}}
    assert not list(tmp_path.glob("1-1.json.tmp"))


def test_wait_until_wakes_on_a_record_written_after_it_looked(tmp_path):
    calls = []

    def check():
        calls.append(1)
        return records.load(tmp_path)

    timer = later(0.2, lambda: records.write(tmp_path / "1-0.json", {"ok": True}))
    try:
        assert records.wait_until(check, 30, "the record", tmp_path) == [{"ok": True}]
    finally:
        timer.cancel()
    # one look at the start, one per change: the temporary file's close and the rename (no polling in between)
    assert len(calls) <= 3, len(calls)


def test_wait_until_fails_naming_what_it_waited_for(tmp_path):
    with pytest.raises(AssertionError, match="the record that never comes within 0.2 s"):
        records.wait_until(lambda: None, 0.2, "the record that never comes", tmp_path)


def test_wait_until_wakes_when_a_process_ends_and_lets_the_check_fail(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])

    def check():
        assert proc.poll() in (None, 0), f"exited {proc.returncode}"
        return None
    try:
        with pytest.raises(AssertionError, match="exited 3"):
            records.wait_until(check, 60, "never", tmp_path, pids=[proc.pid])
    finally:
        proc.wait()


def test_without_inotify_the_waits_fall_back_to_a_slow_poll(tmp_path, monkeypatch):
    monkeypatch.setattr(records.Changes, "__init__", lambda self, directory, mask=0: setattr(self, "_fd", None))
    timer = later(0.1, lambda: records.write(tmp_path / "1-0.json", {}))
    try:
        assert records.wait_until(lambda: records.by_round_rank(tmp_path), 30, "the record", tmp_path)
        assert records.wait_path(tmp_path / "1-0.json", timeout=5)
    finally:
        timer.cancel()


def test_changes_refuses_a_directory_that_is_not_there(tmp_path):
    with pytest.raises(FileNotFoundError):
        records.Changes(tmp_path / "missing")


def test_wait_path_wakes_on_a_touch_and_ticks_meanwhile(tmp_path):
    ticks = []
    flag = tmp_path / "release"
    timer = later(0.3, flag.touch)
    try:
        assert records.wait_path(flag, timeout=30, tick=lambda: ticks.append(1), tick_s=0.05)
    finally:
        timer.cancel()
    assert ticks, "the heartbeat was not called while waiting"
    assert not records.wait_path(tmp_path / "never", timeout=0.1)


def test_log_growth_wakes_a_modify_watch(tmp_path):
    log = tmp_path / "agent.err"
    log.write_text("")

    def append():
        with open(log, "a") as f:
            f.write("round 2 began\n")
    timer = later(0.2, append)
    try:
        found = records.wait_until(lambda: "round 2" in log.read_text(), 30, "the line", tmp_path,
                                   mask=records.IN_MODIFY)
    finally:
        timer.cancel()
    assert found


def test_the_reaper_stamps_the_exit_and_leaves_poll_working():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    reaper = procs.Reaper(proc, "t")
    assert proc.poll() is None and reaper.wait(0.05) is None and reaper.ended_at is None
    proc.stdin.close()
    assert reaper.wait(30) == 0
    assert reaper.ended_at is not None and proc.poll() == 0


def test_gone_and_gone_within_follow_a_process_to_its_end():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert not procs.gone(proc.pid)
        with pytest.raises(AssertionError, match="1 worker\\(s\\) still alive after 0.1 s"):
            procs.gone_within([psutil.Process(proc.pid)], 0.1, "worker(s)")
        proc.stdin.close()
        procs.gone_within(procs.processes([proc.pid]), 30)
        assert procs.gone(proc.pid)  # a zombie until reaped: gone all the same
    finally:
        proc.wait()
    assert procs.gone(proc.pid) and procs.processes([proc.pid]) == []


def test_kill_tree_takes_the_group_and_a_descendant_in_a_session_of_its_own(tmp_path):
    pidfile = tmp_path / "escaped.pid"  # the sleeps are the processes to kill, not waits
    launcher = subprocess.Popen(["sh", "-c", f"sleep 60 & setsid sh -c 'echo $$ > {pidfile}; exec sleep 60' & wait"],
                                start_new_session=True)
    try:
        records.wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 30, "the escaped child", tmp_path)
        tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
        assert int(pidfile.read_text()) in {p.pid for p in tree}
        procs.kill_tree(launcher.pid)
        procs.gone_within(tree, 30)
    finally:
        launcher.kill()
        launcher.wait()


def test_agent_command_spells_the_loopback_flags():
    cmd = procs.agent_command("127.0.0.1:2379", "r", "node-0", "1:2", 2, ["--max-restarts", "1"], ["w.py", "x"])
    assert cmd[:3] == [sys.executable, "-m", "etcd_agent"]
    assert cmd[3:] == ["--etcd-endpoints", "127.0.0.1:2379", "--run-id", "r", "--node-id", "node-0", "--nnodes",
                       "1:2", "--nproc-per-node", "2", "--local-addr", "127.0.0.1", "--max-restarts", "1", "w.py", "x"]
    assert os.path.basename(procs.TORCHRUN[0]).startswith("python")
