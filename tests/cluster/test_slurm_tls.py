"""deploy/slurm.sbatch against an etcd cluster with mutual TLS and password auth, every security setting given
through the recipe's environment (ETCD_AGENT_CACERT, _CERT, _KEY, _USER, _PASSWORD_FILE).

The cluster: certificates from deploy/etcd-cluster/make-certs.sh for etcd1..etcd3 at their bed addresses, a second
3-member etcd on the bed's etcd hosts (clients on https port 2381, which requires a certificate the CA signed),
auth enabled with a root user (make-certs.sh's root.pem) and a user `slurm-jobs` that may read and write the
agents' keys (/etcd-agent/) and nothing else.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from . import bed as cluster_bed
from .slurm import DEPLOY, job_output, records, status, submit, wait_end

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

CLIENT_PORT, PEER_PORT, METRICS_PORT = 2381, 2382, 2383
USER, PASSWORD = "slurm-jobs", "slurm-jobs-secret"


class TlsMember(cluster_bed.NamespacedEtcd):
    """A member on the bed's etcd host ``name``, serving clients over TLS with client certificates required."""

    scheme = "https"

    def __init__(self, pki: Path, **kwargs):
        self.pki = pki
        super().__init__(**kwargs)

    health_url = property(lambda self: f"http://{self.host}:{METRICS_PORT}")

    def command(self, binary: str) -> list[str]:
        tls = [f"--cert-file={self.pki / f'{self.name}.pem'}", f"--key-file={self.pki / f'{self.name}-key.pem'}",
               f"--trusted-ca-file={self.pki / 'ca.pem'}", "--client-cert-auth",
               f"--listen-metrics-urls={self.health_url}"]
        return super().command(binary) + tls


@pytest.fixture(scope="module")
def tls_etcd(cluster, tmp_path_factory):
    """(endpoints, pki directory, etcdctl's environment as root) of the TLS cluster, auth enabled."""
    base = tmp_path_factory.mktemp("tls-etcd")
    pki = base / "pki"
    members = [f"{e}={cluster_bed.address(e)}" for e in cluster_bed.ETCDS]
    made = subprocess.run([str(DEPLOY / "etcd-cluster" / "make-certs.sh"), str(pki), *members], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert made.returncode == 0, made.stderr
    peers = ",".join(f"{e}=http://{cluster_bed.address(e)}:{PEER_PORT}" for e in cluster_bed.ETCDS)
    servers = [TlsMember(pki, name=e, data_dir=str(base / e), host=cluster_bed.address(e), client_port=CLIENT_PORT,
                         peer_port=PEER_PORT, initial_cluster=peers, cluster_token="etcd-agent-bed-tls")
               for e in cluster_bed.ETCDS]
    try:
        for server in servers:
            server.spawn()
        for server in servers:
            server.wait_ready(30)
        endpoints = ",".join(f"https://{cluster_bed.address(e)}:{CLIENT_PORT}" for e in cluster_bed.ETCDS)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
        env.update(ETCDCTL_API="3", ETCDCTL_ENDPOINTS=endpoints, ETCDCTL_CACERT=str(pki / "ca.pem"),
                   ETCDCTL_CERT=str(pki / "root.pem"), ETCDCTL_KEY=str(pki / "root-key.pem"))
        for step in (["user", "add", "root:root-secret"], ["role", "add", "root"],
                     ["user", "grant-role", "root", "root"], ["role", "add", USER],
                     ["role", "grant-permission", USER, "--prefix=true", "readwrite", "/etcd-agent/"],
                     ["user", "add", f"{USER}:{PASSWORD}"], ["user", "grant-role", USER, USER], ["auth", "enable"]):
            done = subprocess.run(["etcdctl", *step], env=env, capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL)
            assert done.returncode == 0, f"etcdctl {' '.join(step)}: {done.stderr}"
        yield endpoints, pki
    finally:
        for server in servers:
            server.stop(timeout=5.0)


def test_slurm_sbatch_over_mutual_tls_with_password_auth(healthy, tls_etcd, tmp_path):
    endpoints, pki = tls_etcd
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    security = {"ETCD_AGENT_CACERT": str(pki / "ca.pem"), "ETCD_AGENT_CERT": str(pki / "client.pem"),
                "ETCD_AGENT_KEY": str(pki / "client-key.pem"), "ETCD_AGENT_USER": USER,
                "ETCD_AGENT_PASSWORD_FILE": str(password)}
    job_id, out = submit(healthy, "slurm.sbatch", tmp_path, ETCD_AGENT_ENDPOINTS=endpoints, **security)
    end = wait_end(healthy, job_id, timeout=120)
    output = job_output(tmp_path, job_id)
    assert end["JobState"] == "COMPLETED", f"{end}\n{output}"
    assert sorted(records(out)) == [(1, r) for r in range(6)]
    said = (f"over mutual TLS (client certificate {pki / 'client.pem'}, CA {pki / 'ca.pem'}), "
            f"password auth as user {USER}")
    assert output.count(said) == len(cluster_bed.NODES), output  # every agent connected that way
    assert PASSWORD not in output
    as_root = ["--etcd-cacert", str(pki / "ca.pem"), "--etcd-cert", str(pki / "root.pem"), "--etcd-key",
               str(pki / "root-key.pem")]
    state = status(healthy, f"slurm-{job_id}", *as_root, endpoints=endpoints)
    assert state["result"]["outcome"] == "succeeded", state
