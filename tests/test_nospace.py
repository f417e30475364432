"""etcd's NOSPACE alarm (its database reached --quota-backend-bytes): running jobs hold their workers, the agents say
once what etcd needs, and the job goes on once an operator has compacted, defragmented and disarmed.

Each test runs a private etcd with a small quota and fills it, through keys outside the job's prefix, until etcd
raises the alarm."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from agents import AgentProc, job_keys, keys_of, poll_until, wait_all, wait_records
from conftest import SESSION_ETCD_ARGS
from etcd_agent.etcd import server as standalone
from etcd_agent.config import EtcdConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.errors import EtcdNoSpace
from etcd_agent.etcd.client import Etcd
from etcd_agent.testing import metrics
from etcd_agent.testing import records as record_files

QUOTA = 8 * 1024 * 1024
FILLER = "/nospace-filler/"
TODO = "etcd refuses writes, so this node keeps its workers as they are"
BACK = "etcd accepts writes again"


@pytest.fixture
def small_etcd():
    server = standalone.EtcdServer(name="etcd-nospace", extra_args=(*SESSION_ETCD_ARGS,
                                                                     f"--quota-backend-bytes={QUOTA}"))
    with server:
        yield server


def fill(endpoint: str) -> EtcdNoSpace:
    """Put big values outside any job's prefix until etcd refuses; returns its refusal."""
    etcd = Etcd(EtcdConfig(parse_endpoints(endpoint)))
    try:
        for i in range(10 * QUOTA // (512 * 1024)):
            try:
                etcd.put(f"{FILLER}{i:04d}", b"x" * (512 * 1024))
            except EtcdNoSpace as exc:
                return exc
        raise AssertionError(f"etcd took {10 * QUOTA} bytes without raising its NOSPACE alarm")
    finally:
        etcd.close()


def refused_txns(server) -> int:
    """How many txns etcd refused with RESOURCE_EXHAUSTED so far (its gRPC metrics): writes the agents tried."""
    return int(metrics.total(server.client_url, "grpc_server_handled_total", grpc_code="ResourceExhausted",
                             grpc_method="Txn"))


def repair(etcdctl, endpoint: str) -> None:
    """What the agents' message tells the operator: free space, compact, defragment, disarm."""
    etcdctl("del", "--prefix", FILLER, endpoints=endpoint)
    status = json.loads(etcdctl("endpoint", "status", "-w", "json", endpoints=endpoint).stdout)
    etcdctl("compact", str(status[0]["Status"]["header"]["revision"]), endpoints=endpoint)
    etcdctl("defrag", endpoints=endpoint)
    etcdctl("alarm", "disarm", endpoints=endpoint)
    assert etcdctl("alarm", "list", endpoints=endpoint).stdout.strip() == ""


def said(agents: list[AgentProc], which, what: str) -> None:
    """Wait until ``which`` (any, all) of the agents logged the what-to-do line; each must keep running meanwhile."""
    def check():
        for a in agents:
            assert a.proc.poll() is None, f"agent {a.node} exited {a.proc.returncode}:\n{a.stderr()[-3000:]}"
        return which(TODO in a.stderr() for a in agents)
    record_files.wait_until(check, 30, what, agents[0].err_path.parent, pids=[a.proc.pid for a in agents],
                            mask=record_files.IN_MODIFY)  # woken by each write to the agents' log files


def test_the_error_says_what_the_operator_must_do(small_etcd):
    exc = fill(small_etcd.endpoint)
    text = str(exc)
    assert "database space exceeded" in text and "--quota-backend-bytes" in text
    for step in ("etcdctl compact", "etcdctl defrag", "etcdctl alarm disarm"):
        assert step in text, text


@pytest.mark.chaos  # etcd runs out of space under a running job
def test_a_worker_failure_during_the_alarm_holds_the_job_until_etcd_is_repaired(small_etcd, run_id, tmp_path,
                                                                                    etcdctl):
    endpoint = small_etcd.endpoint
    fail_now = tmp_path / "fail-now"
    out = tmp_path / "out"
    out.mkdir()
    agents = [AgentProc(endpoint, run_id, f"node-{i}", tmp_path, [str(out), "--fail-rank", "1", "--fail-when",
                                                                  str(fail_now)], nnodes="2",
                        extra=["--max-restarts", "1"]) for i in range(2)]
    first = wait_records(out, {(1, 0), (1, 1)}, agents)
    fill(endpoint)
    fail_now.touch()  # rank 1 fails now; its agent cannot write the restart
    said(agents, any, "no agent said that etcd refuses writes")
    failing = next(a for a in agents if TODO in a.stderr())
    healthy = next(a for a in agents if a is not failing)
    # it keeps trying at its own pace: wait for a few more refused writes, then look again
    tried = refused_txns(small_etcd)
    poll_until(lambda: refused_txns(small_etcd) >= tried + 2, 30, "the agent did not try its write again")
    assert [a.proc.poll() for a in agents] == [None, None], [a.stderr()[-3000:] for a in agents]
    rank0 = first[(1, 0)]["pid"]
    assert psutil_alive(rank0), "the healthy worker (rank 0) was stopped during the alarm"
    err = failing.stderr()
    assert err.count(TODO) == 1, err[-3000:]
    assert "etcdctl compact" in err and "etcdctl defrag" in err and "etcdctl alarm disarm" in err
    assert "Traceback" not in err
    repair(etcdctl, endpoint)
    assert wait_all(agents, timeout=60) == [0, 0], [a.stderr()[-3000:] for a in agents]
    assert BACK in failing.stderr()
    assert TODO not in healthy.stderr() or healthy.stderr().count(TODO) == 1
    keys = job_keys(endpoint, run_id)
    assert keys[keys_of(run_id).restarts()]["used"] == 1
    assert keys[keys_of(run_id).result()]["outcome"] == "succeeded"
    assert keys[keys_of(run_id).result()]["round"] == 2


@pytest.mark.chaos  # etcd runs out of space under a running job
def test_workers_that_all_succeed_during_the_alarm_finish_the_job_after_the_repair(small_etcd, run_id, tmp_path,
                                                                                  etcdctl):
    endpoint = small_etcd.endpoint
    release = tmp_path / "release"
    out = tmp_path / "out"
    out.mkdir()
    agents = [AgentProc(endpoint, run_id, f"node-{i}", tmp_path, [str(out), "--hold", str(release)], nnodes="2")
              for i in range(2)]
    wait_records(out, {(1, 0), (1, 1)}, agents)
    fill(endpoint)
    release.touch()  # every worker exits 0 now; no agent can write its exit key
    said(agents, all, "not every agent said that etcd refuses writes")
    assert [a.proc.poll() for a in agents] == [None, None], [a.stderr()[-3000:] for a in agents]
    repair(etcdctl, endpoint)
    assert wait_all(agents, timeout=60) == [0, 0], [a.stderr()[-3000:] for a in agents]
    for a in agents:
        err = a.stderr()
        assert err.count(TODO) == 1 and BACK in err and "Traceback" not in err, err[-3000:]
    keys = job_keys(endpoint, run_id)
    result = keys[keys_of(run_id).result()]
    assert result["outcome"] == "succeeded" and result["round"] == 1
    assert {k.rsplit("/", 1)[1] for k in keys if k.startswith(keys_of(run_id).exits(1))} == {"node-0", "node-1"}


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_an_agent_starting_on_a_full_etcd_exits_saying_what_etcd_needs(small_etcd, run_id, tmp_path):
    fill(small_etcd.endpoint)
    agent = AgentProc(small_etcd.endpoint, run_id, "node-0", tmp_path, [str(tmp_path)])
    assert agent.wait(30) == 1
    err = agent.stderr()
    assert "database space exceeded" in err and "etcdctl alarm disarm" in err, err
    assert "--etcd-endpoints" not in err and "Traceback" not in err, err


def test_every_etcd_started_here_compacts_and_has_an_explicit_quota(etcd_server, tmp_path):
    """--standalone, one-node jobs and a c10d endpoint's etcd are EtcdServers: they compact by themselves under a
    quota; a flag given in extra_args wins over the default."""
    command = standalone.EtcdServer(name="x", data_dir=str(tmp_path)).command("etcd")
    for arg in ("--auto-compaction-mode=revision", "--auto-compaction-retention=100000",
                "--quota-backend-bytes=4294967296"):
        assert arg in command, command
    mine = standalone.EtcdServer(name="x", data_dir=str(tmp_path),
                                 extra_args=("--quota-backend-bytes=1000",)).command("etcd")
    assert [a for a in mine if a.startswith("--quota-backend-bytes")] == ["--quota-backend-bytes=1000"]
    if not isinstance(etcd_server, standalone.EtcdServer):
        pytest.skip("the session etcd runs in a container")
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{etcd_server.client_url}/metrics") as r:
        assert "etcd_server_quota_backend_bytes 4.294967296e+09" in r.read().decode()


def test_the_shipped_etcd_recipes_compact_and_set_a_quota():
    deploy = Path(__file__).parent.parent / "deploy"
    wanted = {"ETCD_AUTO_COMPACTION_MODE": "periodic", "ETCD_AUTO_COMPACTION_RETENTION": "24h",
              "ETCD_QUOTA_BACKEND_BYTES": "8589934592"}
    for member in ("etcd1", "etcd2", "etcd3"):
        lines = (deploy / "etcd-cluster" / f"{member}.env").read_text().splitlines()
        env = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
        assert {k: env.get(k) for k in wanted} == wanted, member
    compose = (deploy / "docker-compose.yml").read_text()
    for key, value in wanted.items():
        assert re.search(rf'^\s+{key}: "?{value}"?$', compose, re.M), key
