"""Multi-node c10d lines without an etcd cluster: the agent that can bind ``--rdzv-endpoint`` serves the job's etcd
there, the others use it, and it stays up until every agent of the job has left. Real agents, real etcd."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from agents import JOB, CommandLine, records, wait_logged

from etcd_agent.cli import flags, job_etcd
from etcd_agent.etcd import server as standalone
from etcd_agent.errors import ConfigError
from etcd_agent.cli.launch import resolve
from etcd_agent.proctree import free_port

SERVES = "this agent serves the job's etcd at"
ALL_LEFT = "every agent of the job has left; stopping the job's etcd"
SPOF = "a single point of failure like torchrun's c10d store"
ETCD_GONE = ("keepalive failed", "could not revoke", "cannot reach etcd", "watch stream broke")  # etcd left first
NOT_LOCAL = "192.0.2.1"  # TEST-NET-1: never an address of this machine


def c10d_line(endpoint: str, run_id: str, node: str, tmp_path: Path, nnodes: str, worker_args=(), extra=()):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return CommandLine(["--nnodes", nnodes, "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                        endpoint, "--rdzv-id", run_id, "--node-id", node, "--local-addr", "127.0.0.1", "--log-dir",
                        str(tmp_path / "logs"), "--last-call", "1", "--stop-timeout", "3", *extra, JOB, str(out),
                        *worker_args], tmp_path, node)


def finished(lines: list[CommandLine], timeout: float = 90.0) -> list[str]:
    codes = [line.wait(timeout) for line in lines]
    assert codes == [0] * len(lines), "\n---\n".join(line.stderr()[-3000:] for line in lines)
    return [line.stderr() for line in lines]


def nothing_serves(port: int) -> bool:
    return not standalone.health(standalone.url("127.0.0.1", port), timeout=0.5)


# --- the command line -----------------------------------------------------------------------------------------------

def launch(tmp_path, monkeypatch, *argv: str):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ETCD_AGENT_ENDPOINTS", raising=False)
    (tmp_path / "train.py").write_text("")
    parser = flags.build_parser("test")
    return resolve(parser, parser.parse_args([*argv, "train.py"]))


def test_a_multi_node_c10d_line_serves_etcd_at_its_endpoint(tmp_path, monkeypatch):
    c10d = ("--nnodes", "1:4", "--rdzv-backend", "c10d", "--rdzv-id", "j", "--rdzv-endpoint")
    got = launch(tmp_path, monkeypatch, *c10d, "head:29500")
    assert got.serve == ("head", 29500) and not got.embedded
    assert got.cfg.etcd.endpoints == (("head", 29500),) and got.cfg.run_id == "j"
    assert len([n for n in got.notes if SPOF in n and "--etcd-endpoints" in n]) == 1
    assert launch(tmp_path, monkeypatch, *c10d, "head").serve == ("head", 29400)  # torchrun's c10d default port
    assert launch(tmp_path, monkeypatch, *c10d, "[::1]:7000").cfg.etcd.endpoints == (("::1", 7000),)
    explicit = launch(tmp_path, monkeypatch, *c10d, "head:29500", "--etcd-endpoints", "e1:2379")
    assert explicit.serve is None and explicit.cfg.etcd.endpoints == (("e1", 2379),)
    with pytest.raises(ConfigError, match="--rdzv-endpoint a:1,b:2: a c10d endpoint is one HOST:PORT"):
        launch(tmp_path, monkeypatch, *c10d, "a:1,b:2")


def test_the_address_to_serve_on(tmp_path):
    port = free_port()
    assert job_etcd.listen_address("127.0.0.1", port) == "127.0.0.1"
    assert job_etcd.listen_address(socket.gethostname(), port) == standalone.WILDCARD  # this host: every interface
    assert job_etcd.listen_address(NOT_LOCAL, port) is None  # not this machine's: a client
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        assert job_etcd.listen_address("127.0.0.1", port) is None  # another process serves there


def test_of_two_racing_for_one_endpoint_exactly_one_serves():
    port = free_port()
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda _: job_etcd.serve_at("127.0.0.1", port), range(2)))
    try:
        serving = [s for s in servers if s is not None]
        assert len(serving) == 1 and serving[0].client_port == port, servers
        assert standalone.health(serving[0].client_url)
    finally:
        for s in servers:
            if s is not None:
                s.stop()
    assert nothing_serves(port)


# --- jobs -----------------------------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("host", ["127.0.0.1", socket.gethostname()], ids=["address", "hostname"])
def test_two_agents_started_together_run_a_job_on_the_etcd_one_of_them_serves(host, run_id, tmp_path):
    port = free_port()
    lines = [c10d_line(f"{host}:{port}", run_id, f"n{i}", tmp_path, "2") for i in range(2)]
    errs = finished(lines)
    found = records(tmp_path / "out")
    assert sorted(found) == [(1, 0), (1, 1)] and {f["env"]["WORLD_SIZE"] for f in found.values()} == {"2"}
    assert sorted(SERVES in err for err in errs) == [False, True]  # the other lost the race, and did not fail
    assert all(err.count(SPOF) == 1 for err in errs)
    assert ALL_LEFT in next(err for err in errs if SERVES in err)
    assert nothing_serves(port)


@pytest.mark.timeout(150)
def test_three_agents_restart_after_a_worker_crash_and_succeed(run_id, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    lines = [c10d_line(endpoint, run_id, f"n{i}", tmp_path, "3", ["--fail-rank", "1", "--fail-round", "1"],
                       ["--max-restarts", "1"]) for i in range(3)]
    finished(lines)
    found = records(tmp_path / "out")
    assert {(2, r) for r in range(3)} <= found.keys()
    assert {found[(2, r)]["env"]["TORCHELASTIC_RESTART_COUNT"] for r in range(3)} == {"1"}


@pytest.mark.timeout(150)
def test_the_serving_agent_keeps_etcd_up_until_the_others_have_left(run_id, tmp_path):
    """The serving agent's worker fails at once (no restart: the job fails) while the others' workers ignore SIGTERM,
    so their agents leave --stop-timeout later: the serving agent's job is over first, and its etcd must outlive
    the others' exit (they revoke their leases through it)."""
    endpoint = f"127.0.0.1:{free_port()}"
    host = c10d_line(endpoint, run_id, "host", tmp_path, "3", ["--always-fail"])
    wait_logged(host, SERVES, 60)  # the first agent serves etcd (it fails at once if it exits first)
    stubborn = ["--ignore-sigterm", "--run-until", str(tmp_path / "never")]
    others = [c10d_line(endpoint, run_id, f"n{i}", tmp_path, "3", stubborn) for i in range(2)]
    assert [line.wait(90) for line in (host, *others)] == [1, 1, 1]
    host_err = host.stderr()
    assert ALL_LEFT in host_err and "still registered" not in host_err, host_err[-3000:]
    for line in others:
        err = line.stderr()
        assert f"job {run_id} failed" in err and SERVES not in err, err[-3000:]
        assert not [w for w in ETCD_GONE if w in err], err[-3000:]


@pytest.mark.timeout(60)
def test_no_etcd_at_the_endpoint_is_one_clear_error(run_id, tmp_path):
    endpoint = f"{NOT_LOCAL}:{free_port()}"  # this machine cannot serve there, and nothing else does
    line = c10d_line(endpoint, run_id, "n0", tmp_path, "2", extra=["--join-timeout", "1"])
    assert line.wait(30) == 2
    err = line.stderr().strip().splitlines()[-1]
    assert err == (f"etcd-agent: error: --rdzv-endpoint {endpoint}: no etcd at {endpoint} after 1 s: the agent "
                   f"that owns {NOT_LOCAL} did not start one")
