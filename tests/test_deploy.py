"""The files under deploy/, tested as shipped.

- ``etcd-cluster/make-certs.sh`` makes a CA, member and client certificates that openssl verifies for the names
  and uses asked, with private keys, refuses bad arguments naming them, never overwrites without --force, and
  with --keep-ca renews or adds certificates under the CA it finds.
- ``etcd-cluster/etcd1.env`` .. ``etcd3.env`` start a real 3-member etcd cluster with mutual TLS on its client and
  peer ports: each file's ETCD_* variables become the flags etcd reads them as, with the hosts, ports and paths
  moved to loopback and the test's directories (``EnvFileMember``). etcdctl finds every member healthy, the peer
  port refuses client certificates, renewed certificates are served without a restart, and the README's steps
  (auth on, a per-job user from ``etcd-job-user.sh``) run a 2-node etcd-agent job over mutual TLS.
- The systemd units pass ``systemd-analyze verify``, the shell scripts ``bash -n``, ``docker-compose.yml``
  ``docker compose config`` (each where the tool exists).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from agents import job_keys, keys_of, start_agents, wait_all
from conftest import kill_then_stop
from etcd_agent.config import EtcdConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.etcd.server import EtcdServer
from etcd_agent.proctree import free_port
from etcd_agent.testing import records as record_files
from etcd_agent.testing.cluster import EtcdCluster
from tls import HAVE_OPENSSL

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CLUSTER_DIR = DEPLOY / "etcd-cluster"
MAKE_CERTS = CLUSTER_DIR / "make-certs.sh"
MEMBERS = ("etcd1", "etcd2", "etcd3")  # the hosts and member names of the shipped .env files
HAVE_ETCD = shutil.which("etcd") is not None

needs_openssl = pytest.mark.skipif(not HAVE_OPENSSL, reason="needs openssl")
needs_etcd = pytest.mark.skipif(not HAVE_OPENSSL or not HAVE_ETCD, reason="needs openssl and etcd")


# --- make-certs.sh -------------------------------------------------------------------------------------------------

def make_certs(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Run make-certs.sh with ``args``; DAYS, CA_DAYS and KEY_TYPE only from ``env``, never from the caller's."""
    base = {k: v for k, v in os.environ.items() if k not in ("DAYS", "CA_DAYS", "KEY_TYPE")}
    return subprocess.run([str(MAKE_CERTS), *args], capture_output=True, text=True, timeout=120,
                          env={**base, **env}, stdin=subprocess.DEVNULL)


def openssl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, f"openssl {' '.join(args)}: {done.stderr}"
    return done


def cert_text(cert: Path) -> str:
    return openssl("x509", "-in", str(cert), "-noout", "-text").stdout


def subject_alt_names(cert: Path) -> set[str]:
    """``{"DNS:name", "IP:address"}``, IP addresses normalized (openssl prints IPv6 in full)."""
    lines = cert_text(cert).splitlines()
    for i, line in enumerate(lines):
        if "X509v3 Subject Alternative Name" in line:
            names = set()
            for item in lines[i + 1].strip().split(", "):
                kind, _, value = item.partition(":")
                names.add(f"IP:{ipaddress.ip_address(value)}" if kind == "IP Address" else f"{kind}:{value}")
            return names
    return set()


def expires_within(cert: Path, days: float) -> bool:
    return openssl("x509", "-in", str(cert), "-noout", "-checkend", str(int(days * 86400)), check=False).returncode == 1


def leaf_names(members: list[str]) -> list[str]:
    return [m.partition("=")[0] for m in members] + ["client", "root"]


CERT_MEMBERS = ["localhost", "etcd-b=10.0.0.12", "etcd-c=10.0.0.13,etcd-c.example.com,fd00::13"]


@needs_openssl
@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_make_certs_makes_a_ca_member_and_client_certificates(tmp_path, key_type):
    out = tmp_path / "pki"
    done = make_certs(str(out), *CERT_MEMBERS, KEY_TYPE=key_type)
    assert done.returncode == 0, done.stderr
    bases = ["ca", *leaf_names(CERT_MEMBERS)]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{b}{s}" for b in bases for s in (".pem", "-key.pem"))
    assert out.stat().st_mode & 0o777 == 0o700
    for base in bases:
        assert (out / f"{base}-key.pem").stat().st_mode & 0o777 == 0o600, base
        assert (out / f"{base}.pem").stat().st_mode & 0o777 == 0o644, base
        # the key is the certificate's key, of the type asked
        pub = openssl("pkey", "-in", str(out / f"{base}-key.pem"), "-pubout").stdout
        assert pub == openssl("x509", "-in", str(out / f"{base}.pem"), "-noout", "-pubkey").stdout, base
        key_text = openssl("pkey", "-in", str(out / f"{base}-key.pem"), "-noout", "-text").stdout
        assert ("prime256v1" in key_text) if key_type == "ec" else ("(2048 bit" in key_text), key_text[:200]

    ca = str(out / "ca.pem")
    assert "CA:TRUE" in cert_text(out / "ca.pem")
    assert not expires_within(out / "ca.pem", 3649) and expires_within(out / "ca.pem", 3651)
    members = leaf_names(CERT_MEMBERS)[:3]
    for base in leaf_names(CERT_MEMBERS):
        cert = out / f"{base}.pem"
        assert "CA:FALSE" in cert_text(cert), base
        assert not expires_within(cert, 364) and expires_within(cert, 366), base
        openssl("verify", "-CAfile", ca, "-purpose", "sslclient", str(cert))  # peers and clients alike
        server = openssl("verify", "-CAfile", ca, "-purpose", "sslserver", str(cert), check=False)
        assert (server.returncode == 0) == (base in members), f"{base} as a server: {server.stdout}{server.stderr}"
    subjects = {b: openssl("x509", "-in", str(out / f"{b}.pem"), "-noout", "-subject").stdout
                for b in leaf_names(CERT_MEMBERS)}
    assert all("CN = etcd-member" in subjects[m] for m in members), subjects
    assert "CN = etcd-agent" in subjects["client"] and "CN = root" in subjects["root"], subjects

    local = {"DNS:localhost", "IP:127.0.0.1"}
    assert subject_alt_names(out / "localhost.pem") == local
    assert subject_alt_names(out / "etcd-b.pem") == local | {"DNS:etcd-b", "IP:10.0.0.12"}
    assert subject_alt_names(out / "etcd-c.pem") == local | {"DNS:etcd-c", "IP:10.0.0.13", "DNS:etcd-c.example.com",
                                                             "IP:fd00::13"}
    assert subject_alt_names(out / "client.pem") == subject_alt_names(out / "root.pem") == set()

    # signed by this CA only
    other = tmp_path / "other"
    assert make_certs(str(other), "etcd1").returncode == 0
    assert openssl("verify", "-CAfile", str(other / "ca.pem"), str(out / "client.pem"), check=False).returncode != 0


@needs_openssl
def test_make_certs_days_sets_the_validity(tmp_path):
    out = tmp_path / "pki"
    done = make_certs(str(out), "etcd1", DAYS="30", CA_DAYS="60")
    assert done.returncode == 0, done.stderr
    for base in ("etcd1", "client", "root"):
        assert not expires_within(out / f"{base}.pem", 29) and expires_within(out / f"{base}.pem", 31), base
    assert not expires_within(out / "ca.pem", 59) and expires_within(out / "ca.pem", 61)


BAD_ARGUMENTS = {  # case: (arguments, environment, what stderr says)
    "no arguments": ([], {}, "usage: make-certs.sh [--force | --keep-ca] OUT_DIR MEMBER"),
    "no member": (["{out}"], {}, "usage: make-certs.sh [--force | --keep-ca] OUT_DIR MEMBER"),
    "unknown option": (["--frobnicate", "{out}", "etcd1"], {}, "unknown option '--frobnicate'"),
    "force and keep-ca": (["--force", "--keep-ca", "{out}", "etcd1"], {}, "--force makes a new CA and --keep-ca"),
    "keep-ca without a CA": (["--keep-ca", "{out}", "etcd1"], {}, "--keep-ca: OUT_DIR '{out}' has no {out}/ca.pem"),
    "underscore": (["{out}", "etcd_1"], {}, "MEMBER 'etcd_1': 'etcd_1' is not a host name"),
    "leading dash": (["--", "{out}", "-etcd1"], {}, "MEMBER '-etcd1': '-etcd1' is not a host name"),
    "twice": (["{out}", "etcd1", "etcd2", "etcd1=10.0.0.1"], {},
              "MEMBER 'etcd1=10.0.0.1': member 'etcd1' is given twice"),
    "bad IPv4": (["{out}", "etcd1=10.0.0.256"], {},
                 "MEMBER 'etcd1=10.0.0.256': '10.0.0.256' is not an IP address or a DNS name"),
    "bad IPv6": (["{out}", "etcd1=fd00:::1"], {}, "MEMBER 'etcd1=fd00:::1': 'fd00:::1' is not an IP address"),
    "short IPv6": (["{out}", "etcd1=fd00:1:2"], {}, "MEMBER 'etcd1=fd00:1:2': 'fd00:1:2' is not an IP address"),
    "empty address": (["{out}", "etcd1="], {}, "MEMBER 'etcd1=': after '=' give ADDR[,ADDR...]"),
    "empty in the list": (["{out}", "etcd1=10.0.0.1,,10.0.0.2"], {}, "MEMBER 'etcd1=10.0.0.1,,10.0.0.2': after '='"),
    "bad name in the list": (["{out}", "etcd1=bad_name"], {},
                             "MEMBER 'etcd1=bad_name': 'bad_name' is not an IP address or a DNS name"),
    "the CA's name": (["{out}", "ca"], {}, "MEMBER 'ca': the name 'ca' would collide"),
    "a key's name": (["{out}", "etcd1-key"], {}, "MEMBER 'etcd1-key': the name 'etcd1-key' would collide"),
    "DAYS 0": (["{out}", "etcd1"], {"DAYS": "0"}, "DAYS '0':"),
    "DAYS words": (["{out}", "etcd1"], {"DAYS": "a year"}, "DAYS 'a year':"),
    "CA_DAYS negative": (["{out}", "etcd1"], {"CA_DAYS": "-1"}, "CA_DAYS '-1':"),
    "DAYS beyond the CA": (["{out}", "etcd1"], {"DAYS": "4000"}, "DAYS 4000 is more than CA_DAYS 3650"),
    "KEY_TYPE": (["{out}", "etcd1"], {"KEY_TYPE": "dsa"}, "KEY_TYPE 'dsa': use ec"),
    "OUT_DIR a file": (["{file}", "etcd1"], {}, "OUT_DIR '{file}' exists and is not a directory"),
}


@needs_openssl
@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_make_certs_refuses_a_bad_argument_naming_it(tmp_path, case):
    args, env, message = BAD_ARGUMENTS[case]
    out, file = tmp_path / "pki", tmp_path / "a-file"
    file.write_text("not a directory\n")
    done = make_certs(*(a.format(out=out, file=file) for a in args), **env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message.format(out=out, file=file) in done.stderr
    assert not out.exists()  # nothing is written before every argument is checked
    assert file.read_text() == "not a directory\n"


@needs_openssl
def test_make_certs_never_overwrites_without_force(tmp_path):
    out = tmp_path / "pki"
    assert make_certs(str(out), "etcd1", "etcd2", "etcd3").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = make_certs(str(out), "etcd1", "etcd2", "etcd3")
    assert again.returncode == 2
    assert f"OUT_DIR '{out}' already has {out}/ca.pem; give --force to replace every file" in again.stderr
    # another member, a file the first run did not write: still refused, for the CA and clients it would replace
    assert make_certs(str(out), "etcd4").returncode == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    forced = make_certs("--force", str(out), "etcd1", "etcd2", "etcd3")
    assert forced.returncode == 0, forced.stderr
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys() and all(after[name] != before[name] for name in after)
    (tmp_path / "old-ca.pem").write_bytes(before["ca.pem"])
    assert openssl("verify", "-CAfile", str(out / "ca.pem"), str(out / "etcd1.pem"), check=False).returncode == 0
    assert openssl("verify", "-CAfile", str(tmp_path / "old-ca.pem"), str(out / "etcd1.pem"),
                   check=False).returncode != 0


@needs_openssl
def test_make_certs_keep_ca_renews_and_adds_members_under_the_same_ca(tmp_path):
    out = tmp_path / "pki"
    assert make_certs(str(out), "etcd1", "etcd2", "etcd3").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    renewed = make_certs("--keep-ca", str(out), "etcd1", "etcd4=10.0.0.14")
    assert renewed.returncode == 0, renewed.stderr
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys() | {"etcd4.pem", "etcd4-key.pem"}
    for name in ("ca.pem", "ca-key.pem", "etcd2.pem", "etcd3-key.pem"):
        assert after[name] == before[name], f"{name} was replaced"
    for name in ("etcd1.pem", "etcd1-key.pem", "client.pem", "root-key.pem"):
        assert after[name] != before[name], f"{name} was not renewed"
    for base in ("etcd1", "etcd2", "etcd4", "client", "root"):
        openssl("verify", "-CAfile", str(out / "ca.pem"), str(out / f"{base}.pem"))
    assert subject_alt_names(out / "etcd4.pem") == {"DNS:etcd4", "IP:10.0.0.14", "DNS:localhost", "IP:127.0.0.1"}
    assert (out / "etcd4-key.pem").stat().st_mode & 0o777 == 0o600

    (out / "ca-key.pem").write_bytes(after["etcd1-key.pem"])  # another key than the CA's
    wrong = make_certs("--keep-ca", str(out), "etcd1")
    assert wrong.returncode == 2 and f"--keep-ca: {out}/ca-key.pem is not the key of {out}/ca.pem" in wrong.stderr
    (out / "ca-key.pem").write_bytes(after["ca-key.pem"])
    short = make_certs("--keep-ca", str(out), "etcd1", DAYS="4000", CA_DAYS="5000")
    assert short.returncode == 2 and f"--keep-ca: the CA {out}/ca.pem expires within DAYS 4000" in short.stderr
    assert (out / "etcd1.pem").read_bytes() == after["etcd1.pem"]


# --- the members' environment files and the systemd units ----------------------------------------------------------

def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (systemd's EnvironmentFile; these files use neither quotes nor continuations)."""
    env = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            key, eq, value = line.partition("=")
            assert eq and re.fullmatch(r"ETCD_[A-Z0-9_]+", key), f"{path.name}:{number}: not ETCD_NAME=VALUE: {line!r}"
            assert key not in env, f"{path.name}:{number}: {key} is set twice"
            assert not value.startswith(("'", '"')) and value == value.strip(), f"{path.name}:{number}: {line!r}"
            env[key] = value
    return env


def env_flags(env: dict[str, str]) -> list[str]:
    """etcd's own mapping: ETCD_FOO_BAR=v is the flag --foo-bar=v."""
    return [f"--{key[len('ETCD_'):].lower().replace('_', '-')}={value}" for key, value in env.items()]


@needs_etcd
def test_env_files_describe_one_cluster_with_mutual_tls_everywhere():
    known = set(re.findall(r"^\s+(--[a-z0-9-]+)", subprocess.run(["etcd", "--help"], capture_output=True,
                                                                    text=True, timeout=120).stdout, re.M))
    assert "--peer-cert-allowed-cn" in known
    envs = {m: read_env_file(CLUSTER_DIR / f"{m}.env") for m in MEMBERS}
    clusters = set()
    for m, env in envs.items():
        first = (CLUSTER_DIR / f"{m}.env").read_text().splitlines()[0]
        assert first.startswith("#") and f"/etc/etcd/{m}.env" in first, first
        unknown = [f for f in env_flags(env) if f.partition("=")[0] not in known]
        assert not unknown, f"{m}.env: etcd has no flag for {unknown} (it would ignore the variable)"
        assert env["ETCD_NAME"] == m
        assert env["ETCD_DATA_DIR"] == f"/var/lib/etcd/{m}"
        for key in ("ETCD_LISTEN_CLIENT_URLS", "ETCD_ADVERTISE_CLIENT_URLS", "ETCD_LISTEN_PEER_URLS",
                    "ETCD_INITIAL_ADVERTISE_PEER_URLS"):
            assert all(u.startswith("https://") for u in env[key].split(",")), f"{m}.env {key}"
        assert env["ETCD_ADVERTISE_CLIENT_URLS"] == f"https://{m}:2379"
        for side in ("", "PEER_"):
            assert env[f"ETCD_{side}CERT_FILE"] == f"/etc/etcd/pki/{m}.pem"
            assert env[f"ETCD_{side}KEY_FILE"] == f"/etc/etcd/pki/{m}-key.pem"
            assert env[f"ETCD_{side}TRUSTED_CA_FILE"] == "/etc/etcd/pki/ca.pem"
            assert env[f"ETCD_{side}CLIENT_CERT_AUTH"] == "true"  # etcd 3.4: never a trusted CA without it
        assert env["ETCD_PEER_CERT_ALLOWED_CN"] == "etcd-member"  # the CN make-certs.sh gives members
        assert env["ETCD_INITIAL_CLUSTER_STATE"] == "new"
        initial = dict(item.split("=", 1) for item in env["ETCD_INITIAL_CLUSTER"].split(","))
        assert initial == {n: f"https://{n}:2380" for n in MEMBERS}
        assert initial[m] == env["ETCD_INITIAL_ADVERTISE_PEER_URLS"]
        clusters.add((env["ETCD_INITIAL_CLUSTER"], env["ETCD_INITIAL_CLUSTER_TOKEN"]))
    assert len(clusters) == 1, clusters
    # apart from the initial cluster (the same in all, above), the files differ only in the member's name
    texts = {re.sub(r"(?m)^ETCD_INITIAL_CLUSTER=.*$", "", (CLUSTER_DIR / f"{m}.env").read_text()).replace(m, "M")
             for m in MEMBERS}
    assert len(texts) == 1, "the .env files differ in more than the member's name"


def test_etcd_unit_runs_etcd_from_the_members_environment_file():
    unit = (CLUSTER_DIR / "etcd@.service").read_text()
    settings = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, value)
    assert settings["EnvironmentFile"] == "/etc/etcd/%i.env"
    assert settings["ExecStart"] == "/usr/bin/etcd"  # no flag: etcd refuses an ETCD_* variable a flag shadows
    assert settings["Type"] == "notify" and settings["Restart"] == "on-failure"
    assert settings["User"] == "etcd" and int(settings["LimitNOFILE"]) >= 65536
    assert settings["StateDirectory"] == "etcd"  # /var/lib/etcd, the .env files' data directories


def test_agent_unit_runs_training_unprivileged_from_a_virtualenv():
    """The agent's unit: a non-root user, PATH that looks in the virtualenv first (an .env file's PATH overrides it:
    systemd gives EnvironmentFile= precedence), and the log directory made for that user."""
    unit = (DEPLOY / "etcd-agent@.service").read_text()
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[", " ")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    assert settings["User"] == ["etcd-agent"] and settings["Group"] == ["etcd-agent"]
    assert "PATH=/opt/etcd-agent/venv/bin:/usr/local/bin:/usr/bin:/bin" in settings["Environment"]
    assert settings["LogsDirectory"] == ["etcd-agent"] and "--log-dir /var/log/etcd-agent" in unit
    assert settings["ExecStart"][0].startswith("/usr/bin/env etcd-agent ")


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit, instance", [("etcd-cluster/etcd@.service", "etcd1"),
                                            ("etcd-agent@.service", "myjob")])
def test_systemd_units_verify(unit, instance, tmp_path):
    """``systemd-analyze verify`` on an instance of the template; it checks that ExecStart's binary exists, so a
    machine whose etcd is elsewhere than /usr/bin/etcd verifies a copy pointing at its own."""
    text = (DEPLOY / unit).read_text()
    if "ExecStart=/usr/bin/etcd\n" in text and not os.access("/usr/bin/etcd", os.X_OK):
        if not HAVE_ETCD:
            pytest.skip("no etcd binary for the unit's ExecStart")
        text = text.replace("ExecStart=/usr/bin/etcd\n", f"ExecStart={shutil.which('etcd')}\n")
    path = tmp_path / Path(unit).name.replace("@.", f"@{instance}.")
    path.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    about_it = [line for line in (done.stdout + done.stderr).splitlines() if path.name in line]
    assert done.returncode == 0 and not about_it, done.stdout + done.stderr


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


# --- shell scripts and docker-compose.yml --------------------------------------------------------------------------

SHELL_SCRIPTS = sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*")
                       if p.is_file() and p.read_bytes().startswith((b"#!/usr/bin/env bash", b"#!/bin/bash")))


def test_every_deploy_shell_script_is_found():
    assert {"etcd-job-user.sh", "etcd-cluster/make-certs.sh", "ssh-launch.sh"} <= set(SHELL_SCRIPTS)
    for script in SHELL_SCRIPTS:
        assert os.access(DEPLOY / script, os.X_OK), f"deploy/{script} is not executable"


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_deploy_shell_script_parses(script):
    done = subprocess.run(["bash", "-n", str(DEPLOY / script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


REMOTE_WORKER = """import os, sys
from etcd_agent.testing import records
out = os.environ["SSH_TEST_OUT"]
records.write(os.path.join(out, f"rank_{os.environ['RANK']}.json"),
              {"cwd": os.getcwd(), "argv": sys.argv[1:], "host": os.environ.get("FAKE_SSH_HOST")})
records.wait_path(os.path.join(out, "release"))
"""


def test_ssh_launch_passes_arguments_as_given_and_stops_every_agent(etcd_endpoint, run_id, tmp_path):
    """deploy/ssh-launch.sh over a stand-in ssh (a pseudo-terminal per host, hung up when ssh ends): the agents run
    in REMOTE_DIR, the worker gets its arguments exactly as given (spaces, quotes, a dollar sign), and SIGTERM to the
    launcher stops every agent (the hangup reaches it as SIGHUP): their registrations leave etcd, the script exits."""
    remote = tmp_path / "remote dir"
    remote.mkdir()
    (remote / "w.py").write_text(REMOTE_WORKER)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "ETCD_AGENT_ENDPOINTS": etcd_endpoint, "NPROC_PER_NODE": "1", "REMOTE_DIR": str(remote),
           "SSH": f"{sys.executable} {ROOT / 'tests' / 'deploy_tools' / 'fake_ssh.py'}", "SSH_TEST_OUT": str(out),
           "ETCD_AGENT_BIN": str(Path(sys.executable).parent / "etcd-agent")}
    args = ["--local-addr", "127.0.0.1", "--log-dir", str(tmp_path / "logs"), "w.py", "a b", "$HOME", "it's"]
    launcher = subprocess.Popen(["bash", str(DEPLOY / "ssh-launch.sh"), "h1 h2", run_id, *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        record_files.wait_until(lambda: len(list(out.glob("rank_*.json"))) == 2, 60, "both workers running", out)
        seen = [json.loads(p.read_text()) for p in sorted(out.glob("rank_*.json"))]
        assert {r["host"] for r in seen} == {"h1", "h2"}
        for r in seen:
            assert r["cwd"] == str(remote) and r["argv"] == ["a b", "$HOME", "it's"], r
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0, output
    assert "[h1] " in output and "[h2] " in output, output[-3000:]
    # ssh ends once its remote command has exited: both agents left (their leases revoked) and their workers stopped
    nodes = keys_of(run_id).nodes()
    assert not [k for k in job_keys(etcd_endpoint, run_id) if k.startswith(nodes)], output[-3000:]
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(remote / "w.py") in " ".join(p.info["cmdline"] or [])
                or "w.py" in (p.info["cmdline"] or [])]


def compose_command() -> list[str] | None:
    """``docker compose`` (the plugin) or ``docker-compose``, whichever answers ``version``; None if neither."""
    candidates = [["docker", "compose"]] if shutil.which("docker") else []
    candidates += [["docker-compose"]] if shutil.which("docker-compose") else []
    for cmd in candidates:
        if subprocess.run([*cmd, "version"], capture_output=True, timeout=120).returncode == 0:
            return cmd
    return None


def test_docker_compose_config():
    if not shutil.which("docker") and not shutil.which("docker-compose"):
        pytest.skip("docker is not on PATH")
    compose = compose_command()
    if compose is None:
        pytest.skip("docker is on PATH but neither `docker compose` nor `docker-compose` works here")
    done = subprocess.run([*compose, "-f", str(DEPLOY / "docker-compose.yml"), "config", "--services"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == list(MEMBERS), done.stdout


def test_docker_compose_file_is_a_three_member_cluster_on_loopback():
    """Host networking (no compose network, so no bridge), every URL on 127.0.0.1; the image etcd's own unless
    ETCD_IMAGE names another. tests/test_compose.py brings it up."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    spec = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = spec["services"]
    assert sorted(services) == list(MEMBERS)
    assert "networks" not in spec
    client_ports = {}
    for name, svc in services.items():
        env = svc["environment"]
        assert svc["image"] == "${ETCD_IMAGE:-quay.io/coreos/etcd:v3.4.23}"
        assert svc["network_mode"] == "host" and "ports" not in svc
        assert env["ETCD_NAME"] == name
        initial = dict(item.split("=", 1) for item in env["ETCD_INITIAL_CLUSTER"].split(","))
        assert initial[name] == env["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == env["ETCD_LISTEN_PEER_URLS"]
        assert env["ETCD_LISTEN_CLIENT_URLS"] == env["ETCD_ADVERTISE_CLIENT_URLS"] == env["ETCDCTL_ENDPOINTS"]
        for url in [*initial.values(), env["ETCD_LISTEN_CLIENT_URLS"]]:
            assert url.startswith("http://127.0.0.1:"), url
        client_ports[name] = int(env["ETCD_LISTEN_CLIENT_URLS"].rsplit(":", 1)[1])
        [volume] = svc["volumes"]
        assert volume == f"{name}-data:{env['ETCD_DATA_DIR']}"
    assert client_ports == {"etcd1": 12379, "etcd2": 22379, "etcd3": 32379}
    assert sorted(spec["volumes"]) == [f"{m}-data" for m in MEMBERS]
