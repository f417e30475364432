"""deploy/docker-compose.yml brought up for real: its three members (host networking, 127.0.0.1 only) from the
image the container tests use (``ETCD_IMAGE``), a 2-node job on them, and a member stopped with compose, the
leader, does not stop the job: it finishes in its first round with no restart spent.

Runs where a compose tool answers (``docker compose`` or Debian's ``docker-compose``) in the container pass
(``ETCD_AGENT_TEST_DOCKER=1``: the engine and the image come from ``containers``); skips with the reason elsewhere.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

import containers
from agents import RoundWatcher, job_keys, keys_of, poll_until, start_agents, wait_all, wait_records
from etcd_agent.etcd.server import health, is_leader
from test_deploy import compose_command

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "deploy" / "docker-compose.yml"
MEMBERS = {"etcd1": "127.0.0.1:12379", "etcd2": "127.0.0.1:22379", "etcd3": "127.0.0.1:32379"}
PORTS = (12379, 12380, 22379, 22380, 32379, 32380)  # the file's client and peer ports

pytestmark = [pytest.mark.chaos, pytest.mark.skipif(not containers.enabled(),
                                                    reason=f"runs in the container pass ({containers.SWITCH}=1)")]


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def compose(run_id):
    """The file's cluster up under a project of its own; ``compose(*args)`` runs compose on it; down -v after."""
    tag = containers.image()
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` works here (apt-get install docker-compose)")
    taken = [p for p in PORTS if port_taken(p)]
    if taken:
        pytest.skip(f"deploy/docker-compose.yml's ports {taken} are in use on 127.0.0.1")
    env = {**os.environ, "ETCD_IMAGE": tag}
    project = f"etcd-agent-test-{os.getpid()}"

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*cmd, "-f", str(COMPOSE_FILE), "-p", project, *args], env=env, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"compose {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}"
        return done

    try:
        run("up", "-d")
        poll_until(lambda: all(health(f"http://{ep}") for ep in MEMBERS.values()), 60,
                   "the compose file's three members were not all healthy")
        yield run
    finally:
        subprocess.run([*cmd, "-f", str(COMPOSE_FILE), "-p", project, "down", "-v", "--timeout", "5"], env=env,
                       capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


def test_a_job_on_the_compose_cluster_outlives_a_member_stopped_with_compose(compose, run_id, tmp_path):
    endpoints = ",".join(MEMBERS.values())
    release = tmp_path / "release"
    agents, out = start_agents(2, endpoints, run_id, tmp_path, ["--run-until", str(release)],
                               extra=["--lease-ttl", "5", "--max-restarts", "3"])
    rounds = RoundWatcher(endpoints, run_id)
    try:
        r1 = rounds.wait_for(lambda v: v["phase"] == "running" and v.get("nodes") == 2, 60)["round"]
        wait_records(out, {(r1, rank) for rank in range(4)}, agents)
        leader = poll_until(lambda: next((n for n, ep in MEMBERS.items() if is_leader(f"http://{ep}")), None), 10,
                            "no member of the compose cluster is the leader")
        compose("stop", leader)
        assert not health(f"http://{MEMBERS[leader]}")
        poll_until(lambda: any(is_leader(f"http://{ep}") for n, ep in MEMBERS.items() if n != leader), 15,
                   "the two members left did not elect a leader")
        release.touch()
        assert wait_all(agents) == [0, 0], [a.stderr()[-2000:] for a in agents]
    finally:
        rounds.close()
    keys = job_keys(endpoints, run_id)
    assert keys[keys_of(run_id).result()]["round"] == r1
    assert keys[keys_of(run_id).restarts()]["used"] == 0
