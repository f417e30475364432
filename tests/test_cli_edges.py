"""The command line's edges: an unknown flag (one line, with the flag meant), the hint of an unexpected error (only
flags the command takes), a reader that leaves early (``| head -1``: a quiet exit 0), and an etcd host name that can
never resolve (at once, naming the flag). Real processes and the real etcd where etcd is involved."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from agents import AgentProc, wait_records
from etcd_agent.cli import flags, hostnames
from etcd_agent.cli.main import main
from etcd_agent.config import EtcdConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.errors import ConfigError
from etcd_agent.etcd.client import Etcd, op_put
from etcd_agent.schema.keys import RunKeys
from etcd_agent.schema.values import JobPointer

CLI = [sys.executable, "-m", "etcd_agent"]


# -- unknown flags ---------------------------------------------------------------------------------------------------


def one_error_line(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    return captured.err.rstrip("\n")


def test_an_unknown_flag_is_one_line_naming_the_flag_meant(capsys):
    assert one_error_line(capsys, "--nproc-per-nodes", "2", "train.py") == \
        "etcd-agent: error: unrecognized argument --nproc-per-nodes; did you mean --nproc-per-node?"
    assert one_error_line(capsys, "--nodes=2", "--etcd-endpoint", "127.0.0.1:1", "train.py") == \
        "etcd-agent: error: unrecognized argument --nodes=2; did you mean --nnodes?"
    assert one_error_line(capsys, "--frobnicate", "train.py") == \
        "etcd-agent: error: unrecognized argument --frobnicate; `etcd-agent --help` lists every flag"
    assert one_error_line(capsys, "--nodes=2", "--lease-tl=9", "train.py") == \
        "etcd-agent: error: unrecognized arguments --nodes=2 (did you mean --nnodes?), --lease-tl=9 (did you mean " \
        "--lease-ttl?); `etcd-agent --help` lists every flag"
    # an unknown flag's value is taken for the script, as under torchrun: what follows is the script's
    assert one_error_line(capsys, "--nodes", "2", "--lease-tl", "9", "train.py") == \
        "etcd-agent: error: unrecognized argument --nodes; did you mean --nnodes?"
    # every subcommand, and doctor
    assert one_error_line(capsys, "status", "--jsn", "--etcd-endpoints", "127.0.0.1:1") == \
        "etcd-agent: error: unrecognized argument --jsn; did you mean --json?"
    assert one_error_line(capsys, "events", "--folow", "--run-id", "r", "--etcd-endpoints", "127.0.0.1:1") == \
        "etcd-agent: error: unrecognized argument --folow; did you mean --follow?"
    assert one_error_line(capsys, "stop", "--reasn", "x", "--run-id", "r", "--etcd-endpoints", "127.0.0.1:1") == \
        "etcd-agent: error: unrecognized arguments --reasn (did you mean --reason?), x; `etcd-agent stop --help` " \
        "lists every flag"
    assert one_error_line(capsys, "doctor", "--standalone", "--max-restart-count", "3", "train.py") == \
        "etcd-agent: error: unrecognized argument --max-restart-count; did you mean --max-restarts?"
    # other usage errors are one line too
    assert one_error_line(capsys, "--nnodes") == "etcd-agent: error: argument --nnodes: expected one argument"


def test_the_scripts_own_arguments_are_never_checked_and_abbreviations_still_resolve():
    parser = flags.build_parser("test")
    ns = parser.parse_args(["--nproc-per-nod", "2", "train.py", "--nproc-per-nodes", "3", "--frobnicate"])
    assert ns.nproc_per_node == "2"  # an abbreviation argparse resolves, as under torchrun
    assert ns.training_script == "train.py" and ns.training_script_args == ["--nproc-per-nodes", "3", "--frobnicate"]


def test_help_lists_the_subcommands():
    got = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60)
    assert got.returncode == 0
    for line in ("etcd-agent status --run-id ID", "etcd-agent stop --run-id ID", "etcd-agent events --run-id ID",
                 "etcd-agent quarantine list|add|release [NODE]", "etcd-agent doctor [this launch's flags]"):
        assert line in got.stdout, got.stdout
    assert got.stdout.startswith("usage: etcd-agent [flags] training_script [training script args ...]\n"
                                 "       etcd-agent {status,stop,events,exporter,quarantine,doctor} [flags] "
                                 "(each has --help)\n")


# -- the hint of an unexpected error ---------------------------------------------------------------------------------


BROKEN = """import sys
import etcd_agent.ops.status as ops
from etcd_agent.cli.main import main

def broken(*args):
    raise RuntimeError("a bug")

ops.run_subcommand = broken
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("name", ["status", "stop", "events"])
def test_an_unexpected_error_hints_at_a_flag_the_subcommand_takes(etcd_endpoint, name):
    argv = [name, "--etcd-endpoints", etcd_endpoint, "--run-id", "r"]
    got = subprocess.run([sys.executable, "-c", BROKEN, *argv], capture_output=True, text=True, timeout=60)
    assert got.returncode == 1
    assert got.stderr == (f"etcd-agent: error: unexpected RuntimeError: a bug (run etcd-agent {name} again with "
                          "--log-level DEBUG for the traceback)\n")
    debug = subprocess.run([sys.executable, "-c", BROKEN, *argv, "--log-level", "DEBUG"], capture_output=True,
                           text=True, timeout=60)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "RuntimeError: a bug" in debug.stderr


# -- a reader that leaves --------------------------------------------------------------------------------------------

SMALL_PIPE = 4096  # the least a pipe holds on Linux: an answer longer than this cannot fit before the reader leaves


def first_line_then_leave(argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``etcd-agent ARGV`` into a pipe of ``SMALL_PIPE`` bytes, read its first line, close the pipe (as
    ``| head -1`` does) and wait for it; stdout in the result is that line."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, SMALL_PIPE)
    proc = subprocess.Popen([*CLI, *argv], stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    with open(read_end, "rb", buffering=0) as reader:  # unbuffered: readline takes the first line and no more
        first = reader.readline().decode()
    _out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, first, err)


@pytest.fixture
def runs_root(etcd_endpoint, run_id):
    """A fresh --etcd-prefix holding 200 runs (each a job pointer): ``status`` then prints far more than a pipe
    holds."""
    root = f"/t-{run_id}"
    etcd = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
    try:
        for start in range(0, 200, 100):
            etcd.txn([], [op_put(RunKeys(root, f"run-{n:03d}").job(), JobPointer(1, time.time()).encode())
                          for n in range(start, start + 100)], where="write the test's runs")
    finally:
        etcd.close()
    return root


@pytest.mark.parametrize("as_json", [True, False])
def test_status_into_a_pipe_closed_early_ends_quietly(etcd_endpoint, runs_root, as_json):
    got = first_line_then_leave(["status", "--etcd-endpoints", etcd_endpoint, "--etcd-prefix", runs_root,
                                 *(["--json"] if as_json else [])])
    assert (got.returncode, got.stderr) == (0, ""), got.stderr
    assert got.stdout == ("[\n" if as_json else "RUN" + " " * 28 + " JOB PHASE     ROUND NODES  RESULT\n")


def test_events_follow_into_a_pipe_closed_early_ends_quietly(etcd_endpoint, run_id, tmp_path):
    """``events --follow | head -1`` on a running job: the reader is gone before the job's next change is printed."""
    out, release = tmp_path / "out", tmp_path / "release"
    out.mkdir()
    agent = AgentProc(etcd_endpoint, run_id, "node-0", tmp_path, [str(out), "--run-until", str(release)])
    wait_records(out, {(1, 0)}, [agent])
    read_end, write_end = os.pipe()
    follow = subprocess.Popen([*CLI, "events", "--etcd-endpoints", etcd_endpoint, "--run-id", run_id, "--follow"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    with open(read_end, "rb", buffering=0) as reader:
        assert reader.readline().decode().startswith("TIME ")
    release.touch()  # the job ends: its last changes are printed to a pipe nobody reads
    assert agent.wait(60) == 0, agent.stderr()[-3000:]
    _out, err = follow.communicate(timeout=60)
    assert (follow.returncode, err) == (0, ""), err


# -- etcd host names that can never resolve --------------------------------------------------------------------------


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv, flag", [
    (["status", "--etcd-endpoints", "etcd.invalid:2379", "--run-id", "r"], "--etcd-endpoints"),
    (["events", "--rdzv-endpoint", "etcd.invalid:2379", "--run-id", "r"], "--rdzv-endpoint"),
    (["stop", "--etcd-endpoints", "etcd.invalid:2379", "--run-id", "r"], "--etcd-endpoints"),
    (["--etcd-endpoints", "etcd.invalid:2379", "--nnodes", "2", "--run-id", "r", "train.py"], "--etcd-endpoints"),
    (["--rdzv-backend", "etcd-v3", "--rdzv-endpoint", "etcd.invalid:2379", "--nnodes", "2", "train.py"],
     "--rdzv-endpoint"),
])
def test_a_host_name_that_cannot_resolve_fails_at_once_naming_the_flag(argv, flag, tmp_path):
    (tmp_path / "train.py").write_text("pass\n")
    # an --etcd-timeout longer than the test may run: a command that ended did not wait it out
    got = subprocess.run([*CLI, *argv, "--etcd-timeout", "600"], capture_output=True, text=True, timeout=90,
                         cwd=tmp_path)
    assert got.returncode == 2, got.stderr
    errors = [line for line in got.stderr.splitlines() if line.startswith("etcd-agent: error: ")]
    assert errors == [f"etcd-agent: error: {flag} etcd.invalid:2379: the host name etcd.invalid does not resolve "
                      "(the .invalid domain never resolves): fix the name, or give the etcd's address"], got.stderr


def test_one_endpoint_that_cannot_resolve_among_others_is_a_warning(etcd_endpoint, run_id):
    got = cli("status", "--etcd-endpoints", f"etcd.invalid:2379,{etcd_endpoint}", "--etcd-prefix", f"/t-{run_id}")
    assert got.returncode == 0, got.stderr
    assert got.stdout == f"no runs under /t-{run_id}\n"
    assert f"--etcd-endpoints etcd.invalid:2379,{etcd_endpoint}: this host name does not resolve: etcd.invalid " \
           "(the .invalid domain never resolves); etcd-agent uses the other endpoints (fix or drop it)" in got.stderr


def _resolver(monkeypatch, answers: dict) -> list[str]:
    """socket.getaddrinfo answering ``answers[host]`` (an exception to raise, or an Event to block on); returns the
    list of the hosts it was asked about."""
    asked = []

    def getaddrinfo(host, *args, **kwargs):
        asked.append(host)
        answer = answers[host]
        if isinstance(answer, threading.Event):
            answer.wait()
            return []
        raise answer
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_only_a_permanent_answer_refuses_a_name(monkeypatch):
    hang = threading.Event()
    _resolver(monkeypatch, {"typo.example": socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
                            "nodata.example": socket.gaierror(socket.EAI_NODATA, "No address associated with hostname"),
                            "busy.example": socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
                            "slow.example": hang})
    try:
        with pytest.raises(ConfigError, match=r"^--rdzv-endpoint typo.example:2379: the host name typo.example does "
                                              r"not resolve \(Name or service not known\)"):
            hostnames.check([("typo.example", 2379)], "--rdzv-endpoint")
        with pytest.raises(ConfigError, match=r"no host name resolves: typo.example \(Name or service not known\), "
                                              r"nodata.example \(No address associated with hostname\)"):
            hostnames.check([("typo.example", 2379), ("nodata.example", 2379)], "--etcd-endpoints")
        # a temporary failure, or a resolver that does not answer in time: left to the client's retries
        assert hostnames.check([("busy.example", 2379)], "--etcd-endpoints") == []
        assert hostnames.check([("slow.example", 2379)], "--etcd-endpoints", timeout=0.2) == []
        assert hostnames.check([("busy.example", 2379), ("typo.example", 2379)], "--etcd-endpoints") == [
            "--etcd-endpoints busy.example:2379,typo.example:2379: this host name does not resolve: typo.example "
            "(Name or service not known); etcd-agent uses the other endpoints (fix or drop it)"]
    finally:
        hang.set()


def test_addresses_are_never_looked_up(monkeypatch):
    asked = _resolver(monkeypatch, {})
    assert hostnames.check([("127.0.0.1", 2379), ("::1", 2379), ("fe80::1%eth0", 2379)], "--etcd-endpoints") == []
    assert asked == []
