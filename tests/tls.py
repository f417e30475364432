"""TLS and auth for tests: a CA and certificates made with openssl (good, expired, wrong host, from another CA),
and an etcd member serving clients over TLS (optionally requiring client certificates, optionally with password
auth enabled), restartable on the same ports and data like ``EtcdServer``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from etcd_agent.config import EtcdConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.etcd.client import Etcd, rpc
from etcd_agent.etcd.server import EtcdServer
from etcd_agent.proctree import free_port

HAVE_OPENSSL = shutil.which("openssl") is not None
PASSWORD = "s3cret-pass"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


class Pki:
    """Files under ``root``: ``ca.pem``; ``server`` (for 127.0.0.1), ``client`` (CN root), ``expired``,
    ``wronghost`` (for 10.9.9.9 only), ``otherca-client`` (signed by another CA) as ``<name>.pem``/``<name>.key``."""

    def __init__(self, root: Path):
        self.root = root
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days",
                "2", "-subj", "/CN=etcd-agent-test-ca", cwd=root)
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "otherca.key", "-out", "otherca.pem",
                "-days", "2", "-subj", "/CN=another-ca", cwd=root)
        self._cert("server", "127.0.0.1", "IP:127.0.0.1")
        self._cert("client", "root")
        self._cert("wronghost", "10.9.9.9", "IP:10.9.9.9")
        self._cert("otherca-client", "root", ca="otherca")
        # expired: valid from the past to the past (openssl x509 -days needs >= 1: backdate with a config)
        self._cert("expired", "127.0.0.1", "IP:127.0.0.1", expired=True)

    def _cert(self, name: str, cn: str, san: str = "", ca: str = "ca", expired: bool = False) -> None:
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={cn}", cwd=self.root)
        ext = self.root / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
        if expired:
            (self.root / "expired.cnf").write_text(
                "[ca]\ndefault_ca=d\n[d]\ndir=.\ndatabase=index.txt\nnew_certs_dir=.\nserial=serial\n"
                "policy=p\ndefault_md=sha256\ncopy_extensions=copy\n[p]\ncommonName=supplied\n")
            (self.root / "index.txt").write_text("")
            (self.root / "serial").write_text("1000\n")
            openssl("ca", "-batch", "-config", "expired.cnf", "-cert", f"{ca}.pem", "-keyfile", f"{ca}.key",
                    "-in", f"{name}.csr", "-out", f"{name}.pem", "-startdate", "20200101000000Z", "-enddate",
                    "20200102000000Z", "-extfile", f"{name}.ext", "-notext", cwd=self.root)
        else:
            openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                    "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=self.root)

    def path(self, name: str) -> str:
        return str(self.root / name)


class TlsEtcd(EtcdServer):
    """One etcd member serving clients over TLS with ``server`` (``cert``: another of the Pki's certificates),
    /health on a plain metrics URL; ``client_cert_auth`` requires client certificates signed by the CA."""

    def __init__(self, pki: Pki, client_cert_auth: bool = False, cert: str = "server", **kwargs):
        self.pki, self.client_cert_auth, self.cert = pki, client_cert_auth, cert
        self.metrics_port = free_port("127.0.0.1")
        super().__init__(**kwargs)

    scheme = "https"
    health_url = property(lambda self: f"http://{self.host}:{self.metrics_port}")
    endpoint = property(lambda self: f"{self.host}:{self.client_port}")

    def command(self, binary: str) -> list[str]:
        tls = [f"--cert-file={self.pki.path(self.cert + '.pem')}", f"--key-file={self.pki.path(self.cert + '.key')}",
               f"--listen-metrics-urls={self.health_url}"]
        if self.client_cert_auth:  # etcd 3.4: a trusted CA without client-cert-auth breaks cert-less clients
            tls += [f"--trusted-ca-file={self.pki.path('ca.pem')}", "--client-cert-auth"]
        return super().command(binary) + tls

    def config(self, client: bool = None, user: str | None = None, password: str | None = None, **kw) -> EtcdConfig:
        client = self.client_cert_auth if client is None else client
        pair = (self.pki.path("client.pem"), self.pki.path("client.key")) if client else (None, None)
        return EtcdConfig(parse_endpoints(self.endpoint), self.pki.path("ca.pem"), *pair, user, password, **kw)

    def enable_auth(self, password: str = PASSWORD) -> None:
        """``etcdctl user add root; role add root; user grant-role root root; auth enable``."""
        etcd = Etcd(self.config())
        try:
            a = lambda c: c.authstub  # noqa: E731
            etcd.call("user add", lambda c, kw: a(c).UserAdd(rpc.AuthUserAddRequest(name="root", password=password),
                                                                 **kw))
            etcd.call("role add", lambda c, kw: a(c).RoleAdd(rpc.AuthRoleAddRequest(name="root"), **kw))
            etcd.call("grant", lambda c, kw: a(c).UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"),
                                                                **kw))
            etcd.call("auth enable", lambda c, kw: a(c).AuthEnable(rpc.AuthEnableRequest(), **kw))
        finally:
            etcd.close()
