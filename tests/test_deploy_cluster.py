"""``deploy/etcd-cluster/etcd1.env`` .. ``etcd3.env`` start a real 3-member etcd cluster with mutual TLS on its
client and peer ports: each file's ETCD_* variables become the flags etcd reads them as, with the hosts, ports and
paths moved to loopback and the test's directories (``EnvFileMember``). etcdctl finds every member healthy, the peer
port refuses client certificates, renewed certificates are served without a restart, and the README's steps (auth
on, a per-job user from ``etcd-job-user.sh``) run a 2-node etcd-agent job over mutual TLS."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest

from agents import job_keys, keys_of, start_agents, wait_all
from conftest import kill_then_stop
from etcd_agent.config import EtcdConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.etcd.server import EtcdServer
from etcd_agent.proctree import free_port
from etcd_agent.testing import records as record_files
from etcd_agent.testing.cluster import EtcdCluster
from deploy_files import CLUSTER_DIR, DEPLOY, MEMBERS, env_flags, make_certs, needs_etcd, read_env_file


# --- a real 3-member cluster from the shipped .env files -------------------------------------------------------------

PORT_ROLES = {"2379": "client", "2380": "peer", "2381": "metrics"}


class EnvFileMember(EtcdServer):
    """Member ``name`` of the shipped cluster, started from ``deploy/etcd-cluster/<name>.env`` moved to loopback:
    each ETCD_* variable becomes the flag etcd reads it as (``env_flags``) after ``localize``; the server's own
    flags (``EtcdServer.command``) are not used. Ready once it logs so and /health answers on the metrics URL."""

    def __init__(self, name: str, ports: dict[str, dict[str, int]], pki: Path, state: Path):
        self.ports = ports[name]
        env = read_env_file(CLUSTER_DIR / f"{name}.env")
        self.flags = env_flags({k: localize(v, name, ports, pki, state) for k, v in env.items()})
        super().__init__(name=name, data_dir=str(state / "logs" / name), client_port=self.ports["client"],
                         peer_port=self.ports["peer"], initial_cluster=env["ETCD_INITIAL_CLUSTER"])

    client_url = property(lambda self: f"https://127.0.0.1:{self.client_port}")
    peer_url = property(lambda self: f"https://127.0.0.1:{self.peer_port}")
    health_url = property(lambda self: f"http://127.0.0.1:{self.ports['metrics']}")

    def command(self, binary: str) -> list[str]:
        return [binary, *self.flags]


def localize(value: str, member: str, ports: dict[str, dict[str, int]], pki: Path, state: Path) -> str:
    """A value of ``member``'s .env file as it reads on loopback: ``SCHEME://HOST:PORT`` with HOST a member's
    name (or 0.0.0.0 / 127.0.0.1: this member) and PORT 2379, 2380 or 2381 becomes that member's client, peer or
    metrics port on 127.0.0.1; /etc/etcd/pki/ becomes ``pki``, /var/lib/etcd/ ``state``. Anything else is kept."""
    def url(m: re.Match) -> str:
        scheme, host, port = m.groups()
        owner = member if host in ("0.0.0.0", "127.0.0.1") else host
        assert owner in ports, f"{member}.env: {m.group(0)} names no member of the cluster"
        return f"{scheme}://127.0.0.1:{ports[owner][PORT_ROLES[port]]}"

    value = re.sub(r"\b(https?)://([A-Za-z0-9.-]+):(2379|2380|2381)\b", url, value)
    assert not re.search(r"://(?!127\.0\.0\.1:)", value), f"{member}.env: a URL left off loopback: {value}"
    return value.replace("/etc/etcd/pki/", f"{pki}/").replace("/var/lib/etcd/", f"{state}/")


class EnvFileCluster(EtcdCluster):
    """The three members of the shipped .env files (``EtcdCluster``'s start and stop), on free loopback ports."""

    def __init__(self, pki: Path, state: Path):
        ports = {m: {role: free_port("127.0.0.1") for role in PORT_ROLES.values()} for m in MEMBERS}
        self.pki = pki
        self.members = [EnvFileMember(m, ports, pki, state) for m in MEMBERS]

    endpoints = property(lambda self: ",".join(m.client_url for m in self.members))

    def tls_flags(self, who: str = "client") -> list[str]:
        """etcdctl's flags for mutual TLS as ``who`` (client: CN etcd-agent; root: CN root)."""
        return [f"--cacert={self.pki / 'ca.pem'}", f"--cert={self.pki / f'{who}.pem'}",
                f"--key={self.pki / f'{who}-key.pem'}"]


@pytest.fixture
def shipped_cluster(tmp_path, request):
    """``shipped_cluster(key_type="ec")``: certificates from make-certs.sh for etcd1..etcd3, then the cluster of the
    shipped .env files on loopback, started; every member is stopped at teardown, started or not."""
    clusters = []

    def start(key_type: str = "ec") -> EnvFileCluster:
        pki = tmp_path / f"pki-{key_type}"
        made = make_certs(str(pki), *MEMBERS, KEY_TYPE=key_type)
        assert made.returncode == 0, made.stderr
        cluster = EnvFileCluster(pki, tmp_path / f"state-{key_type}")
        clusters.append(cluster)
        return cluster.start(timeout=30)

    request.addfinalizer(lambda: [kill_then_stop(c) for c in clusters])
    return start


def client_context(cluster: EnvFileCluster, who: str) -> ssl.SSLContext:
    """TLS as ``who`` (a base name of make-certs.sh's files), trusting only the cluster's CA."""
    ctx = ssl.create_default_context(cafile=str(cluster.pki / "ca.pem"))
    ctx.load_cert_chain(str(cluster.pki / f"{who}.pem"), str(cluster.pki / f"{who}-key.pem"))
    return ctx


def served_certificate(cluster: EnvFileCluster, member: EnvFileMember) -> bytes:
    """The certificate (DER) ``member`` shows a new client connection."""
    import socket

    with socket.create_connection(("127.0.0.1", member.client_port), timeout=10) as sock:
        with client_context(cluster, "client").wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)


def peer_get(cluster: EnvFileCluster, member: EnvFileMember, who: str) -> list:
    """GET /members on ``member``'s peer port with the certificate of ``who``, trusting only the cluster's CA."""
    ctx = client_context(cluster, who)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    with opener.open(f"{member.peer_url}/members", timeout=10) as resp:
        return json.loads(resp.read())


def logged(member: EnvFileMember, text: str) -> None:
    log = Path(member.log_path)
    record_files.wait_until(lambda: text in log.read_text(), 10, f"etcd {member.name} logged {text!r}", log.parent,
                            mask=record_files.IN_MODIFY)


@needs_etcd
@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_shipped_cluster_is_healthy_over_mutual_tls(shipped_cluster, etcdctl, key_type):
    cluster = shipped_cluster(key_type)
    endpoints = cluster.endpoints
    health = etcdctl(*cluster.tls_flags(), "endpoint", "health", "--write-out=json", endpoints=endpoints)
    found = {h["endpoint"]: h["health"] for h in json.loads(health.stdout)}
    assert found == {m.client_url: True for m in cluster.members}, health.stdout
    members = json.loads(etcdctl(*cluster.tls_flags(), "member", "list", "--write-out=json",
                                 endpoints=endpoints).stdout)["members"]
    assert sorted(m["name"] for m in members) == list(MEMBERS)
    assert all(u.startswith("https://") for m in members for u in m["peerURLs"] + m["clientURLs"]), members

    etcdctl(*cluster.tls_flags(), "put", "/deploy-test/key", "value", endpoints=cluster.members[0].client_url)
    got = etcdctl(*cluster.tls_flags(), "get", "/deploy-test/key", "--print-value-only",
                  endpoints=cluster.members[2].client_url)
    assert got.stdout.strip() == "value"

    # mutual TLS: no client certificate, no service; the peer port takes member certificates only
    first, second = cluster.members[:2]
    bare = etcdctl(f"--cacert={cluster.pki / 'ca.pem'}", "get", "/deploy-test/key", "--dial-timeout=1s",
                   "--command-timeout=1s", endpoints=first.client_url, check=False)
    assert bare.returncode != 0 and "value" not in bare.stdout
    logged(first, "client didn't provide a certificate")
    assert len(peer_get(cluster, second, "etcd1")) == 3
    for who in ("client", "root"):
        with pytest.raises(OSError):
            peer_get(cluster, second, who)
    logged(second, "client certificate authentication failed")

    # renewal as the README says: make-certs.sh --keep-ca, and a member shows its new certificate without a restart
    pem = lambda: ssl.PEM_cert_to_DER_cert((cluster.pki / "etcd1.pem").read_text())  # noqa: E731
    old = pem()
    assert served_certificate(cluster, first) == old
    renewed = make_certs("--keep-ca", str(cluster.pki), *MEMBERS, KEY_TYPE=key_type)
    assert renewed.returncode == 0, renewed.stderr
    assert pem() != old and served_certificate(cluster, first) == pem()
    health = etcdctl(*cluster.tls_flags(), "endpoint", "health", "--write-out=json", endpoints=endpoints)
    assert [h["health"] for h in json.loads(health.stdout)] == [True] * 3, health.stdout  # the renewed client.pem


@needs_etcd
def test_readme_steps_run_a_job_with_a_per_job_user_over_mutual_tls(shipped_cluster, etcdctl, run_id, tmp_path):
    """Auth on as the README says (root user and role, with root.pem as root), a per-job user from
    deploy/etcd-job-user.sh, then a 2-node etcd-agent job with the README's flags against all three members."""
    cluster = shipped_cluster()
    as_root = cluster.tls_flags("root")
    for step in (["user", "add", "root:root-secret"], ["role", "add", "root"], ["user", "grant-role", "root", "root"],
                 ["auth", "enable"]):
        etcdctl(*as_root, *step, endpoints=cluster.endpoints)
    # auth is on: client.pem alone is user etcd-agent, who does not exist; root.pem is root without a password
    refused = etcdctl(*cluster.tls_flags(), "get", "/x", endpoints=cluster.endpoints, check=False)
    assert refused.returncode != 0 and "etcdserver:" in refused.stderr, refused.stderr
    etcdctl(*as_root, "get", "/x", endpoints=cluster.endpoints)

    password = tmp_path / "job-password"
    password.write_text("job-secret\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env.update(ETCDCTL_ENDPOINTS=cluster.endpoints, ETCDCTL_CACERT=str(cluster.pki / "ca.pem"),
               ETCDCTL_CERT=str(cluster.pki / "root.pem"), ETCDCTL_KEY=str(cluster.pki / "root-key.pem"))
    made = subprocess.run([str(DEPLOY / "etcd-job-user.sh"), run_id, str(password)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert made.returncode == 0, made.stderr
    assert f"user job-{run_id} may read and write /etcd-agent/{run_id}/ and read /etcd-agent/.quarantine/" \
        in made.stdout

    ca, cert, key = (str(cluster.pki / f) for f in ("ca.pem", "client.pem", "client-key.pem"))
    extra = ["--etcd-cacert", ca, "--etcd-cert", cert, "--etcd-key", key, "--etcd-user", f"job-{run_id}",
             "--etcd-password-file", str(password)]
    agents, out = start_agents(2, cluster.endpoints, run_id, tmp_path, [], nproc=1, extra=extra)
    assert wait_all(agents, timeout=60) == [0, 0], [a.stderr()[-2000:] for a in agents]
    assert len(list(out.glob("*.json"))) == 2
    for a in agents:
        assert f"over mutual TLS (client certificate {cert}, CA {ca}), password auth as user job-{run_id}" \
            in a.stderr()
    root = EtcdConfig(parse_endpoints(cluster.endpoints), ca, str(cluster.pki / "root.pem"),
                      str(cluster.pki / "root-key.pem"))
    assert job_keys(cluster.endpoints, run_id, cfg=root)[keys_of(run_id).result()]["outcome"] == "succeeded"
