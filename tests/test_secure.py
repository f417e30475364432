"""Operating etcd-agent securely, against real etcd members started with TLS, mutual TLS and password auth
(certificates made by the test): auth tokens that survive an etcd restart, secrets kept from workers and outputs,
endpoint schemes, certificate checks at start and handshakes that fail for a permanent reason."""

from __future__ import annotations

import shutil

import pytest

from agents import job_keys, keys_of, start_agents, wait_all, wait_records
from etcd_agent.flags import PASSWORD_ENV
from tls import HAVE_OPENSSL, PASSWORD, Pki, TlsEtcd

pytestmark = pytest.mark.skipif(not HAVE_OPENSSL or not shutil.which("etcd"), reason="needs openssl and etcd")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def auth_etcd(pki):
    """TLS with password auth on (user root); one per test: tests restart it."""
    server = TlsEtcd(pki, name="auth").start()
    server.enable_auth()
    yield server
    server.stop()


def secure_job_keys(server: TlsEtcd, run_id: str) -> dict:
    from etcd_agent import txns
    from etcd_agent.etcd import Etcd
    from etcd_agent.keys import RunKeys
    import json

    etcd = Etcd(server.config(user="root", password=PASSWORD))
    try:
        keys = txns.current_job(etcd, RunKeys("/etcd-agent", run_id))
        kvs, _ = etcd.get_prefix(keys.prefix)
        return {kv.key: json.loads(kv.value) for kv in kvs}
    finally:
        etcd.close()


def test_etcd_restart_under_auth_then_a_crash(auth_etcd, pki, run_id, tmp_path, monkeypatch):
    """The job survives an etcd restart under password auth exactly as without auth: after the restart every
    agent's watch, txns and keepalives work again (new tokens), so a crash then restarts the job and it succeeds."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    crash, release = tmp_path / "crash", tmp_path / "release"
    extra = ["--etcd-cacert", pki.path("ca.pem"), "--etcd-user", "root", "--lease-ttl", "5", "--max-restarts", "2"]
    agents, out = start_agents(2, auth_etcd.endpoint, run_id, tmp_path, ["--fail-rank", "1", "--fail-round", "1",
                               "--fail-when", str(crash), "--run-until", str(release)], nproc=1, extra=extra)
    wait_records(out, {(1, 0), (1, 1)}, agents, timeout=60)
    auth_etcd.restart()
    crash.touch()
    wait_records(out, {(2, 0), (2, 1)}, agents, timeout=60)
    release.touch()
    assert wait_all(agents, timeout=60) == [0, 0], [a.stderr()[-3000:] for a in agents]
    state = secure_job_keys(auth_etcd, run_id)
    keys = keys_of(run_id)
    assert state[keys.result()]["outcome"] == "succeeded"
    assert state[keys.restarts()]["used"] == 1
    for a in agents:
        assert a.stderr().count("invalid auth token") < 5, a.stderr()[-3000:]
