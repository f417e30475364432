"""Operating etcd-agent securely, against real etcd members started with TLS, mutual TLS and password auth
(certificates made by the test): auth tokens that survive an etcd restart, secrets kept from workers and outputs,
endpoint schemes, certificate checks at start and handshakes that fail for a permanent reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agents import AGENT_LINE, WORKERS, job_keys, keys_of, start_agents, wait_all, wait_records
from containers import member_class
from etcd_agent.cli.flags import PASSWORD_ENV
from tls import HAVE_OPENSSL, PASSWORD, TlsEtcd

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not HAVE_OPENSSL or not shutil.which("etcd"), reason="needs openssl and etcd")


def _auth_server(pki) -> TlsEtcd:
    server = member_class(TlsEtcd)(pki, name="auth").start()
    server.enable_auth()
    return server


@pytest.fixture(scope="module")
def auth_etcd(pki):
    """TLS with password auth on (user root), shared by the module's tests: each has its own run id (and job user),
    none restarts it."""
    server = _auth_server(pki)
    yield server
    server.stop()


@pytest.fixture
def own_auth_etcd(pki):
    """The same, private to one test, which may restart it."""
    server = _auth_server(pki)
    yield server
    server.stop()


def secure_job_keys(server: TlsEtcd, run_id: str) -> dict:
    return job_keys(server.endpoint, run_id, cfg=server.config(user="root", password=PASSWORD))


@pytest.mark.chaos  # etcd restarts under the agents, then a worker crashes
def test_etcd_restart_under_auth_then_a_crash(own_auth_etcd, pki, run_id, tmp_path, monkeypatch):
    """The job survives an etcd restart under password auth exactly as without auth: after the restart every
    agent's watch, txns and keepalives work again (new tokens), so a crash then restarts the job and it succeeds."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    crash, release = tmp_path / "crash", tmp_path / "release"
    extra = ["--etcd-cacert", pki.path("ca.pem"), "--etcd-user", "root", "--lease-ttl", "5", "--max-restarts", "2"]
    agents, out = start_agents(2, own_auth_etcd.endpoint, run_id, tmp_path, ["--fail-rank", "1", "--fail-round", "1",
                               "--fail-when", str(crash), "--run-until", str(release)], nproc=1, extra=extra)
    wait_records(out, {(1, 0), (1, 1)}, agents, timeout=60)
    own_auth_etcd.restart()
    crash.touch()
    wait_records(out, {(2, 0), (2, 1)}, agents, timeout=60)
    release.touch()
    assert wait_all(agents, timeout=60) == [0, 0], [a.stderr()[-3000:] for a in agents]
    state = secure_job_keys(own_auth_etcd, run_id)
    keys = keys_of(run_id)
    assert state[keys.result()]["outcome"] == "succeeded"
    assert state[keys.restarts()]["used"] == 1
    for a in agents:
        assert a.stderr().count("invalid auth token") < 5, a.stderr()[-3000:]


def test_password_never_reaches_workers_etcd_or_status(auth_etcd, pki, run_id, tmp_path, monkeypatch):
    """The password from --etcd-password-file (or $ETCD_AGENT_ETCD_PASSWORD, set here too) is not in any worker's
    environment; a worker that prints it anyway has it redacted from its failure report, the job's result, every
    etcd value, `status` and the agents' own log lines."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    extra = ["--etcd-cacert", pki.path("ca.pem"), "--etcd-user", "root", "--etcd-password-file", str(secret),
             "--max-restarts", "0"]
    agents, out = start_agents(2, auth_etcd.endpoint, run_id, tmp_path, ["--always-fail-rank", "1", "--say",
                               str(secret)], nproc=1, extra=extra)
    assert wait_all(agents, timeout=60) == [1, 1]
    envs = [json.loads(p.read_text())["env"] for p in out.glob("*.json")]
    assert len(envs) == 2
    assert all(PASSWORD_ENV not in env and PASSWORD not in json.dumps(env) for env in envs)
    state = secure_job_keys(auth_etcd, run_id)
    result = state[keys_of(run_id).result()]
    assert result["outcome"] == "failed" and "[redacted]" in result["root_cause"]["message"]
    assert PASSWORD not in json.dumps(state)
    status = subprocess.run([sys.executable, "-m", "etcd_agent", "status", "--etcd-endpoints", auth_etcd.endpoint,
                             "--run-id", run_id, "--etcd-cacert", pki.path("ca.pem"), "--etcd-user", "root",
                             "--etcd-password-file", str(secret), "--json"], capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 0, status.stderr
    assert "[redacted]" in status.stdout and PASSWORD not in status.stdout + status.stderr
    for a in agents:
        own = [line for line in a.stderr().splitlines() if AGENT_LINE.match(line)]
        assert own and not any(PASSWORD in line for line in own)


@pytest.mark.parametrize("case, message", [
    ("missing", "--etcd-password-file {path}: cannot read it: No such file or directory"),
    ("empty", "--etcd-password-file {path}: the file's first line is empty"),
    ("no user", "--etcd-password-file {path}: a password file needs --etcd-user"),
])
def test_bad_password_file(case, message, tmp_path, pki):
    path = tmp_path / "pw"
    if case != "missing":
        path.write_text("" if case == "empty" else "pw\n")
    user = [] if case == "no user" else ["--etcd-user", "root"]
    got = subprocess.run([sys.executable, "-m", "etcd_agent", "--etcd-endpoints", "127.0.0.1:1", "--run-id", "x",
                          "--nnodes", "2", "--etcd-cacert", pki.path("ca.pem"), *user, "--etcd-password-file",
                          str(path), "job.py"], capture_output=True, text=True, timeout=60)
    assert got.returncode == 2
    assert message.format(path=path) in got.stderr


@pytest.fixture(scope="module")
def mtls_etcd(pki):
    server = member_class(TlsEtcd)(pki, client_cert_auth=True, name="mtls").start()
    yield server
    server.stop()


def test_two_node_job_over_mutual_tls_says_how_it_connects(mtls_etcd, pki, run_id, tmp_path):
    extra = ["--etcd-cacert", pki.path("ca.pem"), "--etcd-cert", pki.path("client.pem"), "--etcd-key",
             pki.path("client.key")]
    agents, out = start_agents(2, f"https://{mtls_etcd.endpoint}", run_id, tmp_path, [], nproc=1, extra=extra)
    assert wait_all(agents, timeout=60) == [0, 0], [a.stderr()[-2000:] for a in agents]
    assert len(list(out.glob("*.json"))) == 2
    for a in agents:
        assert f"over mutual TLS (client certificate {pki.path('client.pem')}, CA {pki.path('ca.pem')}), no " \
               "password auth" in a.stderr()


def test_password_auth_over_https_endpoints(auth_etcd, pki, run_id, tmp_path, monkeypatch):
    """https:// with --etcd-cacert; the log says TLS and the user."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    extra = ["--etcd-cacert", pki.path("ca.pem"), "--etcd-user", "root"]
    agents, out = start_agents(2, f"https://{auth_etcd.endpoint}", run_id, tmp_path, [], nproc=1, extra=extra)
    assert wait_all(agents, timeout=60) == [0, 0], [a.stderr()[-2000:] for a in agents]
    for a in agents:
        assert f"over TLS (CA {pki.path('ca.pem')}), password auth as user root" in a.stderr()


@pytest.fixture(scope="module")
def bad_servers(pki):
    """etcd members whose certificates are wrong for the client: expired, and for another host."""
    servers = {"expired": member_class(TlsEtcd)(pki, cert="expired", name="expired"),
               "wronghost": member_class(TlsEtcd)(pki, cert="wronghost", name="wronghost")}
    for s in servers.values():
        s.start()
    yield servers
    for s in servers.values():
        s.stop()


def run_cli(endpoint: str, *flags: str) -> subprocess.CompletedProcess:
    """The launcher with an --etcd-timeout longer than the test may run (600 s): a command that ended did not wait
    it out (the first attempt decided)."""
    return subprocess.run([sys.executable, "-m", "etcd_agent", "--etcd-endpoints", endpoint, "--run-id", "tls",
                           "--nnodes", "2", "--etcd-timeout", "600", *flags, str(WORKERS / "job.py")],
                          capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize("case, message", [
    ("unknown CA", "etcd's certificate is not signed by a CA in --etcd-cacert {otherca} (unknown CA)"),
    ("expired server", "etcd's certificate has expired"),
    ("wrong host", "etcd's certificate is not valid for 127.0.0.1"),
    ("client cert from another CA", "etcd refused the client certificate --etcd-cert {othercert}"),
    ("no client cert", "etcd requires a client certificate (--etcd-cert and --etcd-key)"),
])
def test_a_permanent_handshake_failure_fails_at_once_in_one_line(case, message, pki, mtls_etcd, auth_etcd,
                                                               bad_servers):
    ca, client = pki.path("ca.pem"), ["--etcd-cert", pki.path("client.pem"), "--etcd-key", pki.path("client.key")]
    endpoint, flags = {
        "unknown CA": (auth_etcd.endpoint, ["--etcd-cacert", pki.path("otherca.pem")]),
        "expired server": (bad_servers["expired"].endpoint, ["--etcd-cacert", ca]),
        "wrong host": (bad_servers["wronghost"].endpoint, ["--etcd-cacert", ca]),
        "client cert from another CA": (mtls_etcd.endpoint, ["--etcd-cacert", ca, "--etcd-cert",
                                        pki.path("otherca-client.pem"), "--etcd-key", pki.path("otherca-client.key")]),
        "no client cert": (mtls_etcd.endpoint, ["--etcd-cacert", ca]),
    }[case]
    assert client  # the good pair, for contrast: test_two_node_job_over_mutual_tls_says_how_it_connects
    got = run_cli(endpoint, *flags)
    assert got.returncode == 2, got.stderr
    expected = message.format(otherca=pki.path("otherca.pem"), othercert=pki.path("otherca-client.pem"))
    assert expected in got.stderr
    lines = [line for line in got.stderr.splitlines() if line.strip()]
    assert len(lines) <= 3, got.stderr  # not dozens of gRPC C-core lines


@pytest.mark.parametrize("case, message", [
    ("expired client cert", "--etcd-cert {expired}: the certificate expired on Jan  2 00:00:00 2020 GMT"),
    ("key of another cert", "--etcd-key {serverkey} is not the key of --etcd-cert {client}"),
    ("garbage CA", "--etcd-cacert {garbage}: not a PEM certificate bundle"),
    ("garbage key", "--etcd-key {garbage}: not a PEM private key"),
    ("garbage cert", "--etcd-cert {garbage}: not a PEM certificate"),
])
def test_bad_certificate_files_are_refused_at_start(case, message, pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    ca, cert, key = pki.path("ca.pem"), pki.path("client.pem"), pki.path("client.key")
    flags = {"expired client cert": (ca, pki.path("expired.pem"), pki.path("expired.key")),
             "key of another cert": (ca, cert, pki.path("server.key")),
             "garbage CA": (str(garbage), cert, key),
             "garbage key": (ca, cert, str(garbage)),
             "garbage cert": (ca, str(garbage), key)}[case]
    got = run_cli("127.0.0.1:1", "--etcd-cacert", flags[0], "--etcd-cert", flags[1], "--etcd-key", flags[2])
    assert got.returncode == 2, got.stderr
    assert message.format(expired=pki.path("expired.pem"), serverkey=pki.path("server.key"), client=cert,
                          garbage=garbage) in got.stderr


def test_auth_enabled_etcd_without_a_user_says_so(auth_etcd, pki, tmp_path):
    got = run_cli(auth_etcd.endpoint, "--etcd-cacert", pki.path("ca.pem"))
    assert got.returncode == 2, got.stderr
    assert "etcd has authentication enabled: give --etcd-user" in got.stderr
    assert "user name is empty" not in got.stderr.replace("etcdserver: user name is empty", "")


def test_status_and_stop_on_an_unreachable_etcd_name_the_endpoints():
    for sub in ("status", "stop"):
        got = subprocess.run([sys.executable, "-m", "etcd_agent", sub, "--etcd-endpoints", "127.0.0.1:1",
                              "--run-id", "x", "--etcd-timeout", "0.5"], capture_output=True, text=True, timeout=60)
        assert got.returncode == 2, got.stderr
        assert "--etcd-endpoints 127.0.0.1:1: cannot reach etcd" in got.stderr


def test_a_per_job_user_runs_its_job_and_cannot_touch_another(auth_etcd, pki, run_id, tmp_path):
    """deploy/etcd-job-user.sh makes a user limited to one run's prefix: its job runs; another run is refused with
    etcd's permission error, and the user cannot read or write another job's keys."""
    from etcd_agent.errors import EtcdAuthError
    from etcd_agent.etcd.client import Etcd

    pw = tmp_path / "job-password"
    pw.write_text("job-secret\n")
    env = {**os.environ, "ETCDCTL_ENDPOINTS": f"https://{auth_etcd.endpoint}", "ETCDCTL_CACERT": pki.path("ca.pem"),
           "ETCDCTL_USER": f"root:{PASSWORD}"}
    made = subprocess.run([str(ROOT / "deploy" / "etcd-job-user.sh"), run_id, str(pw)], capture_output=True,
                          text=True, timeout=60, env=env)
    assert made.returncode == 0, made.stderr
    assert (f"user job-{run_id} may read and write /etcd-agent/{run_id}/ and read /etcd-agent/.quarantine/ "
            "(cluster-wide quarantine records), nothing else") in made.stdout
    extra = ["--etcd-cacert", pki.path("ca.pem"), "--etcd-user", f"job-{run_id}", "--etcd-password-file", str(pw)]
    agents, out = start_agents(2, auth_etcd.endpoint, run_id, tmp_path, [], nproc=1, extra=extra)
    assert wait_all(agents, timeout=60) == [0, 0], [a.stderr()[-2000:] for a in agents]
    assert secure_job_keys(auth_etcd, run_id)[keys_of(run_id).result()]["outcome"] == "succeeded"
    (tmp_path / "other").mkdir()
    other = start_agents(1, auth_etcd.endpoint, f"{run_id}-other", tmp_path / "other", [], nproc=1, extra=extra)[0]
    assert wait_all(other, timeout=60) != [0]
    assert "permission denied" in other[0].stderr()
    etcd = Etcd(auth_etcd.config(user=f"job-{run_id}", password="job-secret"))
    try:
        with pytest.raises(EtcdAuthError, match="permission denied"):
            etcd.put(f"/etcd-agent/{run_id}-other/0001/round", b"{}")
        with pytest.raises(EtcdAuthError, match="permission denied"):
            etcd.get("/etcd-agent/someone-else/job")
        assert etcd.get("/etcd-agent/.quarantine/node-0")[0] is None  # every job honours cluster records
        with pytest.raises(EtcdAuthError, match="permission denied"):  # but only QUARANTINE_ACCESS=readwrite writes
            etcd.put("/etcd-agent/.quarantine/node-0", b"{}")
    finally:
        etcd.close()
