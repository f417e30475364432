"""A worker group's output with real processes: torchrun's routing of stdout and stderr (console, redirects, tee,
per-rank maps, the prefix, --local-ranks-filter, duplicate filters) and a progress bar that reaches the console
before the worker ends."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

import pytest

from etcd_agent.config import StdSpec
from etcd_agent.node.worker_logs import Dest, line_prefix, route
from etcd_agent.node.api import WorkerExit

pytest.register_assert_rewrite("worker_groups")  # a plugin (pytest_plugins): marked before its first import
from worker_groups import COLD_AND_WARM, REPO, TIMEOUT, WORKERS, assignment, rank_dir  # noqa: E402

pytest_plugins = ("worker_groups",)  # the fixtures make_group and mailbox


# -- output: torchrun's routing -----------------------------------------------------------------------------------

ECHO_OUT = "hello stdout\nsecond line\nno newline at end"


def run_to_end(group, exits) -> list[WorkerExit]:
    group.start(assignment())
    done = exits.wait()
    group.stop("done")  # joins the pumps: everything is on the console and in the files now
    return done


def lines_of(text: str, prefix: str) -> list[str]:
    """The console lines with ``prefix`` (lines of different workers interleave; each line stays whole)."""
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_route_is_torchruns_reify():
    assert route(0, 0, True) == (Dest.CONSOLE, Dest.CONSOLE)
    assert route(3, 0, True) == (Dest.FILE, Dest.FILE)
    assert route(0, 3, True) == (Dest.TEE, Dest.TEE)
    assert route(2, 1, True) == (Dest.TEE, Dest.FILE)  # the effective redirect is redirects | tee
    assert route(0, 1, True) == (Dest.TEE, Dest.CONSOLE)
    assert route(0, 0, False) == (Dest.NULL, Dest.NULL)  # a rank outside --local-ranks-filter
    assert route(1, 2, False) == (Dest.FILE, Dest.FILE)  # teed streams go to the file only
    assert line_prefix("trainer", 1, 5) == "[trainer1]:"
    assert line_prefix("trainer", 1, 5, "<${role_name}|${rank}|${local_rank}|${other}> ") == "<trainer|5|1|${other}> "


@COLD_AND_WARM
def test_default_output_reaches_the_console_unprefixed(make_group, tmp_path, capfd, warm):
    group, exits = make_group("echo.py", warm=warm)
    run_to_end(group, exits)
    out, err = capfd.readouterr()
    assert (out, err) == (ECHO_OUT, "hello stderr\n")
    d = rank_dir(tmp_path, 4)
    assert not (d / "stdout.log").exists()
    assert (d / "stderr.log").read_text() == "hello stderr\n"  # kept for failure reports


@COLD_AND_WARM
def test_default_stderr_is_kept_for_the_failure_report(make_group, capfd, warm):
    group, exits = make_group("exit_code.py", "3", warm=warm)
    (ex,) = run_to_end(group, exits)
    _, err = capfd.readouterr()
    assert err == "".join(f"stderr line {i}\n" for i in range(30)) + "about to end with 3\n"
    report = group.failure_report(ex).to_json()
    tail = report["stderr_tail"].splitlines()
    assert len(tail) == 20 and tail[0] == "stderr line 11" and tail[-1] == "about to end with 3"
    assert report["message"].endswith("about to end with 3")


@COLD_AND_WARM
def test_redirects_keep_the_console_clean(make_group, tmp_path, capfd, warm):
    group, exits = make_group("echo.py", nproc=2, redirects=StdSpec(3), warm=warm)
    run_to_end(group, exits)
    assert capfd.readouterr() == ("", "")
    for rank in (4, 5):
        d = rank_dir(tmp_path, rank)
        assert (d / "stdout.log").read_text() == ECHO_OUT
        assert (d / "stderr.log").read_text() == "hello stderr\n"


@COLD_AND_WARM
def test_tee_prefixes_console_lines_and_keeps_plain_logs(make_group, tmp_path, capfd, warm):
    group, exits = make_group("echo.py", nproc=2, tee=StdSpec(3), warm=warm)
    run_to_end(group, exits)
    out, err = capfd.readouterr()
    assert all(line.startswith(("[default0]:", "[default1]:")) for line in (out + err).splitlines())
    for local_rank in (0, 1):
        prefix = f"[default{local_rank}]:"  # torchrun's header: no space after the colon
        assert lines_of(out, prefix) == [prefix + line for line in ECHO_OUT.splitlines()]
        assert lines_of(err, prefix) == [prefix + "hello stderr"]
        d = rank_dir(tmp_path, 4 + local_rank)
        assert (d / "stdout.log").read_text() == ECHO_OUT
        assert (d / "stderr.log").read_text() == "hello stderr\n"


def test_a_per_rank_map(make_group, tmp_path, capfd):
    group, exits = make_group("echo.py", nproc=2, tee=StdSpec.parse("0:3,1:1", "--tee"),
                              redirects=StdSpec.parse("1:2", "--redirects"))
    run_to_end(group, exits)
    out, err = capfd.readouterr()
    assert sorted(out.splitlines()) == sorted(f"[default{r}]:{line}" for r in (0, 1) for line in ECHO_OUT.splitlines())
    assert err == "[default0]:hello stderr\n"  # rank 1's stderr is redirected: its file only
    for rank in (4, 5):
        assert (rank_dir(tmp_path, rank) / "stdout.log").read_text() == ECHO_OUT
        assert (rank_dir(tmp_path, rank) / "stderr.log").read_text() == "hello stderr\n"


def test_role_names_the_prefix_and_the_environment(make_group, tmp_path, capfd):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    group, exits = make_group("record_env.py", str(out_dir), role="trainer", tee=StdSpec(1))
    run_to_end(group, exits)
    assert capfd.readouterr().out == "[trainer0]:recorded rank 4\n"
    assert json.loads((out_dir / "env_4.json").read_text())["env"]["ROLE_NAME"] == "trainer"


def test_the_prefix_template_of_torchrun(make_group, capfd, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", "[${role_name}-${rank}-${local_rank}] ")
    group, exits = make_group("echo.py", tee=StdSpec(2))
    run_to_end(group, exits)
    assert capfd.readouterr() == (ECHO_OUT, "[default-4-0] hello stderr\n")


@pytest.mark.parametrize("tee", [StdSpec(3), StdSpec()])
def test_local_ranks_filter_hides_other_ranks_from_the_console(make_group, tmp_path, capfd, tee):
    group, exits = make_group("echo.py", nproc=2, tee=tee, local_ranks_filter=frozenset({0}))
    run_to_end(group, exits)
    out, err = capfd.readouterr()
    prefix = "[default0]:" if tee.value else ""
    assert out.splitlines() == [prefix + line for line in ECHO_OUT.splitlines()]
    assert err == prefix + "hello stderr\n"
    hidden = rank_dir(tmp_path, 5)
    assert (hidden / "stderr.log").read_text() == "hello stderr\n"
    if tee.value:
        assert (hidden / "stdout.log").read_text() == ECHO_OUT  # teed: the file only
    else:
        assert not (hidden / "stdout.log").exists()  # a console stream: /dev/null, as in torchrun


def test_duplicate_filters_copy_matching_teed_lines(make_group, tmp_path, capfd):
    group, exits = make_group("echo.py", nproc=3, tee=StdSpec(3), local_ranks_filter=frozenset({0, 1}),
                              duplicate_stdout_filters=("second", "no newline"))
    run_to_end(group, exits)
    round_dir = rank_dir(tmp_path, 4).parent
    filtered = (round_dir / "filtered_stdout.log").read_text()
    assert sorted(filtered.splitlines()) == [  # the shown ranks' teed lines only, with their headers
        "[default0]:no newline at end", "[default0]:second line", "[default1]:no newline at end",
        "[default1]:second line"]
    assert not (round_dir / "filtered_stderr.log").exists()
    assert len(capfd.readouterr().out.splitlines()) == 6


def test_duplicate_filters_without_tee_leave_an_empty_file(make_group, tmp_path, capfd):
    group, exits = make_group("echo.py", duplicate_stderr_filters=("hello",))
    run_to_end(group, exits)
    assert (rank_dir(tmp_path, 4).parent / "filtered_stderr.log").read_text() == ""  # torchrun creates it too
    assert capfd.readouterr() == (ECHO_OUT, "hello stderr\n")


def read_until(fd: int, wanted: bytes, timeout: float) -> bytes:
    """Read ``fd`` until ``wanted`` was seen (or end of file, or the timeout); returns all that was read."""
    data, deadline = b"", time.monotonic() + timeout
    while wanted not in data and (remaining := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def test_a_progress_bar_reaches_the_console_before_the_worker_ends(mailbox, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    agent = subprocess.Popen([sys.executable, str(WORKERS / "console_agent.py"), str(tmp_path / "logs"),
                              str(WORKERS / "progress_bar.py")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        conn, _ = mailbox.sock.accept()  # the worker drew its bar and now waits until we close this
        with conn:
            seen = read_until(agent.stderr.fileno(), b"\r", TIMEOUT)
            assert seen == b"progress 50%\r", "a chunk without a newline did not reach the console at once"
        out, err = agent.communicate(timeout=TIMEOUT)
        assert (agent.returncode, out, err) == (0, b"", b"progress 100%\n")
        log = tmp_path / "logs" / "console" / "job_0001" / "stub" / "round_0000" / "rank_0" / "stderr.log"
        assert log.read_bytes() == b"progress 50%\rprogress 100%\n"
    finally:
        agent.kill()
        agent.wait(TIMEOUT)
