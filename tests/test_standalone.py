"""Private etcd processes: start, answer, refuse a taken port, restart with data, freeze, cluster failover."""

from __future__ import annotations

import os
import socket

import psutil
import pytest

from etcd_agent import errors
from etcd_agent.etcd import server as standalone
from etcd_agent.testing.procs import gone


@pytest.mark.timeout(30)
def test_session_server_answers(etcd_server, etcdctl, run_id):
    key = f"/etcd-agent-test/{run_id}/greeting"
    etcdctl("put", key, "hello")
    assert etcdctl("get", key, "--print-value-only").stdout.strip() == "hello"
    assert standalone.health(etcd_server.client_url)


@pytest.mark.timeout(30)
def test_second_server_on_a_taken_port_fails_naming_the_port(etcd_server):
    if not isinstance(etcd_server, standalone.EtcdServer):
        pytest.skip("the session etcd runs in a container")
    second = standalone.EtcdServer(name="second", client_port=etcd_server.client_port)
    with pytest.raises(errors.EtcdUnavailable) as caught:
        second.start(timeout=60)
    message = str(caught.value)
    assert f"127.0.0.1:{etcd_server.client_port}" in message
    assert "address already in use" in message
    assert not second.running
    data_dir = second.data_dir
    second.stop()
    assert not os.path.exists(data_dir)
    assert standalone.health(etcd_server.client_url), "the first server must be untouched"


@pytest.mark.chaos  # the server restarts, then is killed and restarted
@pytest.mark.timeout(60)
def test_restart_keeps_data_and_stop_leaves_nothing(etcdctl, tmp_path):
    server = standalone.EtcdServer(name="restart", extra_args=standalone.FAST_ELECTION_ARGS,
                                   log_file=str(tmp_path / "etcd.log"))
    with server:
        ports = (server.client_port, server.peer_port)
        etcdctl("put", "/k", "v1", endpoints=server.endpoint)
        first_pid = server.pid
        server.restart()
        assert gone(first_pid)
        assert (server.client_port, server.peer_port) == ports
        assert etcdctl("get", "/k", "--print-value-only", endpoints=server.endpoint).stdout.strip() == "v1"
        etcdctl("put", "/k", "v2", endpoints=server.endpoint)
        server.restart(hard=True)
        assert etcdctl("get", "/k", "--print-value-only", endpoints=server.endpoint).stdout.strip() == "v2"
        pid, data_dir = server.pid, server.data_dir
    assert gone(pid)
    assert not os.path.exists(data_dir)
    assert "ready to serve client requests" in (tmp_path / "etcd.log").read_text()


@pytest.mark.chaos  # the server is frozen (SIGSTOP)
@pytest.mark.timeout(60)
def test_freeze_and_thaw(etcdctl):
    with standalone.EtcdServer(name="freeze") as server:
        etcdctl("put", "/k", "v", endpoints=server.endpoint)
        server.freeze()
        assert psutil.Process(server.pid).status() == psutil.STATUS_STOPPED
        assert not standalone.health(server.client_url, timeout=0.5)
        server.thaw()
        assert psutil.Process(server.pid).status() != psutil.STATUS_STOPPED
        assert etcdctl("get", "/k", "--print-value-only", endpoints=server.endpoint).stdout.strip() == "v"
        server.freeze()
        pid = server.pid
    assert gone(pid), "stopping a frozen server must still end it"


@pytest.mark.chaos  # the leader is killed
@pytest.mark.timeout(90)
def test_cluster3_elects_a_leader_and_survives_losing_it(etcd_cluster3, etcdctl, run_id):
    cluster = etcd_cluster3
    assert len(cluster.members) == 3
    assert cluster.endpoints == ",".join(m.endpoint for m in cluster.members)
    key = f"/etcd-agent-test/{run_id}/k"
    etcdctl("put", key, "before", endpoints=cluster.endpoints)

    leader = cluster.leader_index()
    cluster.member(leader).kill()
    survivors = ",".join(m.endpoint for i, m in enumerate(cluster.members) if i != leader)
    new_leader = cluster.leader_index(timeout=60)
    assert new_leader != leader
    etcdctl("put", key, "after", endpoints=survivors)
    for i, member in enumerate(cluster.members):
        if i != leader:
            got = etcdctl("get", key, "--print-value-only", "--consistency=s", endpoints=member.endpoint)
            assert got.stdout.strip() in ("before", "after")
    assert etcdctl("get", key, "--print-value-only", endpoints=survivors).stdout.strip() == "after"

    cluster.member(leader).restart(timeout=30)
    assert etcdctl("get", key, "--print-value-only",
                   endpoints=cluster.member(leader).endpoint).stdout.strip() == "after"


def test_find_etcd_binary_names_a_missing_file(monkeypatch, tmp_path):
    missing = tmp_path / "no-such-etcd"
    monkeypatch.setenv(standalone.BINARY_ENV, str(missing))
    with pytest.raises(errors.ConfigError) as caught:
        standalone.find_etcd_binary()
    assert str(missing) in str(caught.value)
    assert standalone.BINARY_ENV in str(caught.value)


def test_find_etcd_binary_without_env_or_path(monkeypatch, tmp_path):
    monkeypatch.delenv(standalone.BINARY_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(errors.ConfigError) as caught:
        standalone.find_etcd_binary()
    message = str(caught.value)
    assert standalone.BINARY_ENV in message and "PATH" in message and "apt-get install etcd-server" in message


def test_find_etcd_binary_prefers_the_env(monkeypatch, tmp_path):
    fake = tmp_path / "etcd-custom"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(standalone.BINARY_ENV, str(fake))
    assert standalone.find_etcd_binary() == str(fake)



@pytest.mark.timeout(30)
def test_a_server_on_every_interface_advertises_the_given_name():
    port = standalone.free_port()
    with standalone.EtcdServer(name="wildcard", host=standalone.WILDCARD, client_port=port,
                               advertise_host=socket.gethostname()) as server:
        assert server.client_url == f"http://127.0.0.1:{port}" and standalone.health(server.client_url)
        assert f"--advertise-client-urls=http://{socket.gethostname()}:{port}" in server.command("etcd")
        assert f"--listen-client-urls=http://0.0.0.0:{port}" in server.command("etcd")
        assert server.peer_url.startswith("http://127.0.0.1:")
