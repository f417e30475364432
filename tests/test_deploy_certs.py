"""``deploy/etcd-cluster/make-certs.sh``, tested as shipped: it makes a CA, member and client certificates that
openssl verifies for the names and uses asked, with private keys, refuses bad arguments naming them, never overwrites
without --force, and with --keep-ca renews or adds certificates under the CA it finds."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

import pytest

from deploy_files import make_certs, needs_openssl


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
