"""The files under deploy/, tested as shipped (make-certs.sh in test_deploy_certs.py, a real cluster from the .env
files in test_deploy_cluster.py).

- ``etcd-cluster/etcd1.env`` .. ``etcd3.env`` describe one cluster with mutual TLS everywhere, and the systemd units
  run etcd from a member's environment file and training unprivileged from a virtualenv.
- The systemd units pass ``systemd-analyze verify``, the shell scripts ``bash -n``, ``docker-compose.yml``
  ``docker compose config`` (each where the tool exists); ssh-launch.sh passes arguments as given and stops every
  agent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from agents import job_keys, keys_of
from etcd_agent.testing import records as record_files
from deploy_files import CLUSTER_DIR, DEPLOY, HAVE_ETCD, MEMBERS, ROOT, env_flags, needs_etcd, read_env_file


# --- the members' environment files and the systemd units ----------------------------------------------------------


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
