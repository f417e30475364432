"""Shared fixtures: a real etcd for the session, a fresh run id per test, a private etcd and a 3-member cluster for
fault tests.

The session etcd and the 3-member cluster are ``etcd`` processes on free loopback ports (``etcd_agent.etcd.server``).
With ``ETCD_AGENT_TEST_DOCKER=1`` they run in containers instead (``containers.py``: testcontainers, a locally built
image, host networking on the same loopback ports); the tests that start an etcd of their own get the same switch
through ``containers.member_class`` and ``containers.cluster``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess

import pytest

import containers
from etcd_agent.etcd import server as standalone

# Watch progress notifications let tests see a watch's revision advance while nothing under their prefix changes.
SESSION_ETCD_ARGS = ("--experimental-watch-progress-notify-interval=500ms",)


@pytest.fixture(scope="session")
def etcd_server():
    """A started etcd for the whole session (a process by default, a container with ETCD_AGENT_TEST_DOCKER=1)."""
    server = containers.member_class()(name="etcd-agent-test", extra_args=SESSION_ETCD_ARGS)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def etcd_endpoint(etcd_server) -> str:
    """``127.0.0.1:PORT`` of the session etcd."""
    return etcd_server.endpoint


@pytest.fixture
def run_id(request) -> str:
    """A run id no other test uses: ``t-<test name>-<6 hex>``, within [A-Za-z0-9_.-] and 128 characters."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-.")
    return f"t-{name[:110]}-{secrets.token_hex(3)}"


@pytest.fixture
def own_etcd():
    """A private etcd with fast elections that the test may restart, freeze, compact or fill: no other test sees
    it (a process, or a container with ETCD_AGENT_TEST_DOCKER=1)."""
    server = containers.member_class()(name="etcd-own", extra_args=standalone.FAST_ELECTION_ARGS).start()
    yield server
    server.stop()


@pytest.fixture
def private_etcd():
    """A private etcd process whose ``/metrics`` only this test moves: the protocol's counts and bytes are read from
    it (``test_protocol_counts``, ``test_plan_bytes``)."""
    server = standalone.EtcdServer(name="etcd-agent-counts")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def etcd_cluster3():
    """A started 3-member etcd cluster with fast elections, fresh for each test (fault tests break it)."""
    cluster = containers.cluster(3, name_prefix="etcd-test",
                                 extra_args=SESSION_ETCD_ARGS + standalone.FAST_ELECTION_ARGS)
    cluster.start()
    try:
        yield cluster
    finally:
        kill_then_stop(cluster)


def kill_then_stop(cluster) -> None:
    """Tear down a cluster whose data nobody needs again: SIGKILL every member at once (a graceful stop makes each
    member hand its leadership over, which takes seconds), then ``stop`` (reaps, removes the data directories)."""
    for member in cluster.members:
        member.kill()
    cluster.stop()


def _etcdctl_binary() -> str:
    found = shutil.which("etcdctl")
    if found:
        return found
    beside = os.path.join(os.path.dirname(standalone.find_etcd_binary()), "etcdctl")
    if os.access(beside, os.X_OK):
        return beside
    pytest.fail("no etcdctl on PATH or beside the etcd binary; install it with `apt-get install etcd-client`")


@pytest.fixture
def etcdctl(etcd_endpoint):
    """``etcdctl(*args, endpoints=None, check=True, timeout=120)`` -> CompletedProcess with text output.

    Runs ``etcdctl --endpoints=<session etcd, or endpoints>`` with ETCDCTL_API=3; with ``check`` a non-zero exit fails
    the test with etcdctl's stderr.
    """
    binary = _etcdctl_binary()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"

    def run(*args: str, endpoints: str | None = None, check: bool = True, timeout: float = 120.0):
        cmd = [binary, f"--endpoints={endpoints or etcd_endpoint}", *args]
        done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited with {done.returncode}: {done.stderr.strip()}")
        return done

    return run



@pytest.fixture(autouse=True)
def _no_agent_left_behind():
    """Kill any agent process a test started and left running (a failed assertion must not leak processes)."""
    yield
    import agents

    while agents.STARTED:
        agents.STARTED.pop().kill()


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA and certificates for TLS tests (``tls.Pki``), made once per session with openssl."""
    from tls import Pki

    return Pki(tmp_path_factory.mktemp("pki"))
