"""torchrun's ``etcd-v3`` backend over TLS: mutual TLS (``etcd_cacert``, ``etcd_cert``, ``etcd_key`` and torch's
names for them) and password auth over TLS (``etcd_user`` with the password from $ETCD_AGENT_ETCD_PASSWORD),
against real etcd processes started with certificates made here."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
from torch.distributed.elastic.rendezvous import RendezvousParameters  # noqa: E402

from etcd_agent.config import EtcdConfig, parse_endpoints  # noqa: E402
from etcd_agent.errors import EtcdError  # noqa: E402
from etcd_agent.etcd import Etcd, rpc  # noqa: E402
from etcd_agent.standalone import free_port  # noqa: E402
from etcd_agent.torch.rendezvous import BACKEND, create_handler  # noqa: E402
from test_torchrun_backend import background  # noqa: E402

pytestmark = [pytest.mark.torch,
              pytest.mark.skipif(not shutil.which("openssl") or not shutil.which("etcd"), reason="needs openssl, etcd")]
PASSWORD = "s3cret-pass"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=etcd-agent-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, cn in (("server", "127.0.0.1"), ("client", "root")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={cn}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", *(["-extfile", "san.ext"] if name == "server" else []), cwd=d)
    return d


def start_etcd(certs: Path, workdir: Path, client_cert_auth: bool):
    port, peer = free_port("127.0.0.1"), free_port("127.0.0.1")
    args = ["etcd", "--name", "tls", "--data-dir", str(workdir / "data"),
            "--listen-client-urls", f"https://127.0.0.1:{port}", "--advertise-client-urls", f"https://127.0.0.1:{port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}", "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
            "--cert-file", str(certs / "server.pem"), "--key-file", str(certs / "server.key")]
    if client_cert_auth:
        args += ["--trusted-ca-file", str(certs / "ca.pem"), "--client-cert-auth"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(workdir / "etcd.log", "w"))
    client = (str(certs / "client.pem"), str(certs / "client.key")) if client_cert_auth else (None, None)
    cfg = EtcdConfig(parse_endpoints(f"127.0.0.1:{port}"), str(certs / "ca.pem"), *client, connect_timeout=1.0)
    deadline = time.monotonic() + 30
    while True:
        etcd = Etcd(cfg)
        try:
            etcd.status()
            return proc, f"127.0.0.1:{port}"
        except EtcdError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError((workdir / "etcd.log").read_text()[-3000:])
        finally:
            etcd.close()


@pytest.fixture(scope="module")
def mtls_etcd(certs, tmp_path_factory):
    proc, endpoint = start_etcd(certs, tmp_path_factory.mktemp("mtls"), client_cert_auth=True)
    yield endpoint
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def auth_etcd(certs, tmp_path_factory):
    """TLS without client certificates, password auth on: user root (role root) with PASSWORD."""
    proc, endpoint = start_etcd(certs, tmp_path_factory.mktemp("auth"), client_cert_auth=False)
    etcd = Etcd(EtcdConfig(parse_endpoints(endpoint), str(certs / "ca.pem")))
    try:  # what `etcdctl user add root; role add root; user grant-role root root; auth enable` does
        stub = lambda c: c.authstub  # noqa: E731
        etcd.call("user add", lambda c, kw: stub(c).UserAdd(rpc.AuthUserAddRequest(name="root", password=PASSWORD),
                                                                 **kw))
        etcd.call("role add", lambda c, kw: stub(c).RoleAdd(rpc.AuthRoleAddRequest(name="root"), **kw))
        etcd.call("grant", lambda c, kw: stub(c).UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"),
                                                               **kw))
        etcd.call("auth enable", lambda c, kw: stub(c).AuthEnable(rpc.AuthEnableRequest(), **kw))
    finally:
        etcd.close()
    yield endpoint
    proc.kill()
    proc.wait()


def two_nodes(endpoint: str, run_id: str, **conf):
    hs = [create_handler(RendezvousParameters(BACKEND, endpoint, run_id, 2, 2, local_addr="127.0.0.1",
                                              timeout=900, node_id=f"n{i}", **conf)) for i in range(2)]
    try:
        infos = [f.result(timeout=60) for f in [background(h.next_rendezvous) for h in hs]]
        assert sorted(i.rank for i in infos) == [0, 1]
        infos[0].store.set("over", "tls")
        assert infos[1].store.get("over") == b"tls"
    finally:
        for h in hs:
            h.shutdown()


def test_mutual_tls(mtls_etcd, certs, run_id):
    two_nodes(mtls_etcd, run_id, protocol="https", etcd_cacert=str(certs / "ca.pem"),
              etcd_cert=str(certs / "client.pem"), etcd_key=str(certs / "client.key"))


def test_mutual_tls_with_torchs_key_names(mtls_etcd, certs, run_id):
    two_nodes(mtls_etcd, run_id, cacert=str(certs / "ca.pem"), ssl_cert=str(certs / "client.pem"),
              ssl_cert_key=str(certs / "client.key"))


def test_password_auth_over_tls(auth_etcd, certs, run_id, monkeypatch):
    monkeypatch.setenv("ETCD_AGENT_ETCD_PASSWORD", PASSWORD)
    two_nodes(auth_etcd, run_id, etcd_cacert=str(certs / "ca.pem"), etcd_user="root")
