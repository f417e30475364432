"""torchrun's ``etcd-v3`` backend over TLS: mutual TLS (``etcd_cacert``, ``etcd_cert``, ``etcd_key`` and torch's
names for them) and password auth over TLS (``etcd_user`` with the password from $ETCD_AGENT_ETCD_PASSWORD),
against real etcd processes started with certificates made here."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("torch")
from torch.distributed.elastic.rendezvous import RendezvousParameters  # noqa: E402

from etcd_agent.torch.rendezvous import BACKEND, create_handler  # noqa: E402
from test_torchrun_backend import background  # noqa: E402
from tls import HAVE_OPENSSL, PASSWORD, TlsEtcd  # noqa: E402

pytestmark = [pytest.mark.torch,
              pytest.mark.skipif(not HAVE_OPENSSL or not shutil.which("etcd"), reason="needs openssl and etcd")]


@pytest.fixture(scope="module")
def mtls_etcd(pki):
    server = TlsEtcd(pki, client_cert_auth=True, name="mtls").start()
    yield server.endpoint
    server.stop()


@pytest.fixture(scope="module")
def auth_etcd(pki):
    """TLS without client certificates, password auth on: user root (role root) with PASSWORD."""
    server = TlsEtcd(pki, name="auth").start()
    server.enable_auth()
    yield server.endpoint
    server.stop()


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


def test_mutual_tls(mtls_etcd, pki, run_id):
    two_nodes(mtls_etcd, run_id, protocol="https", etcd_cacert=pki.path("ca.pem"), etcd_cert=pki.path("client.pem"),
              etcd_key=pki.path("client.key"))


def test_mutual_tls_with_torchs_key_names(mtls_etcd, pki, run_id):
    two_nodes(mtls_etcd, run_id, cacert=pki.path("ca.pem"), ssl_cert=pki.path("client.pem"),
              ssl_cert_key=pki.path("client.key"))


def test_password_auth_over_tls(auth_etcd, pki, run_id, monkeypatch):
    monkeypatch.setenv("ETCD_AGENT_ETCD_PASSWORD", PASSWORD)
    two_nodes(auth_etcd, run_id, etcd_cacert=pki.path("ca.pem"), etcd_user="root")
