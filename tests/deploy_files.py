"""What the test_deploy*.py modules share about the files under deploy/: their paths, the members the shipped .env
files name, make-certs.sh run with a clean environment, and a member's .env file read as etcd reads it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tls import HAVE_OPENSSL

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CLUSTER_DIR = DEPLOY / "etcd-cluster"
MAKE_CERTS = CLUSTER_DIR / "make-certs.sh"
MEMBERS = ("etcd1", "etcd2", "etcd3")  # the hosts and member names of the shipped .env files
HAVE_ETCD = shutil.which("etcd") is not None

needs_openssl = pytest.mark.skipif(not HAVE_OPENSSL, reason="needs openssl")
needs_etcd = pytest.mark.skipif(not HAVE_OPENSSL or not HAVE_ETCD, reason="needs openssl and etcd")


def make_certs(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Run make-certs.sh with ``args``; DAYS, CA_DAYS and KEY_TYPE only from ``env``, never from the caller's."""
    base = {k: v for k, v in os.environ.items() if k not in ("DAYS", "CA_DAYS", "KEY_TYPE")}
    return subprocess.run([str(MAKE_CERTS), *args], capture_output=True, text=True, timeout=120,
                          env={**base, **env}, stdin=subprocess.DEVNULL)


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
