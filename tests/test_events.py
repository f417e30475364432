"""``etcd-agent events`` replays a job's history from etcd's revisions (and ``--follow`` streams it), against
running agents: a job with a restart and a lost node; the text's columns, and the times of changes that carry none."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from agents import AgentProc, start_agents, wait_all, wait_records
from etcd_agent.config import EtcdConfig, JobSpec
from etcd_agent.coord import txns
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.etcd.client import Etcd
from etcd_agent.ops.events import DETAILS, HEADER, when
from etcd_agent.schema.keys import RunKeys
from etcd_agent.schema.values import NodeInfo


def events(endpoint: str, run_id: str, *flags: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etcd_agent", "events", "--etcd-endpoints", endpoint, "--run-id",
                           run_id, *flags], capture_output=True, text=True, timeout=timeout)


@pytest.mark.chaos  # node-2's agent is SIGKILLed
def test_history_of_a_job_with_a_restart_and_a_lost_node(etcd_endpoint, run_id, tmp_path):
    release, crash = tmp_path / "release", tmp_path / "crash"
    agents, out = start_agents(3, etcd_endpoint, run_id, tmp_path, ["--fail-rank", "1", "--fail-when", str(crash),
                               "--run-until", str(release)], nproc=1, nnodes="2:3",
                               extra=["--max-restarts", "3", "--lease-ttl", "3"])
    wait_records(out, {(1, 0), (1, 1), (1, 2)}, agents, timeout=60)
    follow = subprocess.Popen([sys.executable, "-m", "etcd_agent", "events", "--etcd-endpoints", etcd_endpoint,
                               "--run-id", run_id, "--follow", "--json"], stdout=subprocess.PIPE, text=True)
    try:
        crash.touch()
        wait_records(out, {(2, 0), (2, 1), (2, 2)}, agents, timeout=60)
        agents[2].proc.send_signal(signal.SIGKILL)  # node-2 is lost: its lease runs out
        agents[2].proc.wait()
        wait_records(out, {(3, 0), (3, 1)}, agents[:2], timeout=60)
        release.touch()
        assert wait_all(agents[:2]) == [0, 0]
        streamed = [json.loads(x) for x in follow.communicate(timeout=120)[0].splitlines()]
    finally:
        follow.kill()
    replayed = events(etcd_endpoint, run_id, "--json")
    assert replayed.returncode == 0, replayed.stderr
    history = [json.loads(x) for x in replayed.stdout.splitlines()]
    # the stream (--follow, started mid-job) agrees with the replay, and stops at the result; the replay also has
    # what came after it (the agents' leases revoked as they exit)
    assert streamed and streamed[-1]["event"] == "result"
    assert [e["event"] for e in history][:len(streamed)] == [e["event"] for e in streamed]
    kinds = [e["event"] for e in history]
    assert kinds.count("round opened") == 3 and kinds.count("round closed") == 3
    assert any(e["event"] == "failure" and e["rank"] == 1 and e["how"] == "exit code 3" for e in history)
    assert any(e["event"] == "node gone" and e["node"] == "node-2" for e in history)
    assert any(e["event"] == "round opened" and "node-2 left round 2" in e["reason"] for e in history)
    assert [e["used"] for e in history if e["event"] == "restart counted"] == [1, 2]
    assert kinds.count("result") == 1 and kinds.count("job ended") == 1
    revisions = [e["revision"] for e in history]
    assert revisions == sorted(revisions)
    text = events(etcd_endpoint, run_id)
    assert text.returncode == 0 and re.search(r"  failure +node-\d +round 1: rank 1 exit code 3", text.stdout)
    print("\n" + text.stdout)
    status = subprocess.run([sys.executable, "-m", "etcd_agent", "status", "--etcd-endpoints", etcd_endpoint,
                             "--run-id", run_id, "--json"], capture_output=True, text=True, timeout=60)
    rounds = json.loads(status.stdout)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["formed_s"] is not None and r["formed_s"] >= 0 and r["ran_s"] >= 0 for r in rounds)
    assert "node-2 left round 2" in rounds[2]["why"]
    shown = subprocess.run([sys.executable, "-m", "etcd_agent", "status", "--etcd-endpoints", etcd_endpoint,
                            "--run-id", run_id], capture_output=True, text=True, timeout=60).stdout
    assert "history, round 3: formed in " in shown and ", ran " in shown
    print(shown)


def columns(row: str) -> tuple[str, str, str, str, str]:
    """(time, revision, kind, node, detail) of one text row, cut at the header's column offsets."""
    at = [HEADER.index(name) for name in ("REVISION", "EVENT", "NODE", "DETAIL")]
    cuts = [row[:at[0]], row[at[0]:at[1]], row[at[1]:at[2]], row[at[2]:at[3]], row[at[3]:]]
    assert all(c.endswith("  ") for c in cuts[:4]), f"a column runs into the next one: {row!r}"
    return tuple(c.strip() for c in cuts)


def test_rows_are_aligned_and_a_delete_shows_no_time(etcd_endpoint, run_id, tmp_path):
    """A one-node job to its end: every row has its time (or "-"), revision, kind and node in the header's columns;
    the registration's delete when the agent leaves has no time of its own (``-`` in text, null in JSON)."""
    out = tmp_path / "out"
    out.mkdir()
    agent = AgentProc(etcd_endpoint, run_id, "node-0", tmp_path, [str(out)])
    assert agent.wait(60) == 0, agent.stderr()[-3000:]
    text = events(etcd_endpoint, run_id)
    assert text.returncode == 0, text.stderr
    header, *rows = text.stdout.splitlines()
    assert header == HEADER and rows
    table = [columns(row) for row in rows]
    history = [json.loads(x) for x in events(etcd_endpoint, run_id, "--json").stdout.splitlines()]
    assert [(e["event"], str(e["revision"]), e.get("node") or "-", when(e["time"])) for e in history] == \
        [(kind, rev, node, wall) for wall, rev, kind, node, _detail in table]
    for wall, _rev, kind, _node, detail in table:
        assert kind in DETAILS and detail
        assert wall == "-" or re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", wall), wall
    gone = [e for e in history if e["event"] == "node gone"]
    assert gone and all(e["time"] is None and e["node"] == "node-0" for e in gone)
    assert [r for r in table if r[2] == "node gone"][0][0] == "-"
    assert all(e["time"] for e in history if e["event"] in ("round opened", "node registered", "result"))
    assert events(etcd_endpoint, run_id).stdout == text.stdout  # the same history, the same text


def test_a_registrations_later_put_is_not_timed_with_the_agents_start(etcd_endpoint, run_id):
    """A health change re-puts the registration, whose time is the agent's start: that change shows no time."""
    etcd = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
    try:
        keys = txns.init_job(etcd, RunKeys("/etcd-agent", run_id), JobSpec(1, 1, "1", 0), time.time())
        started = time.time() - 3600
        etcd.put(keys.node("n0"), NodeInfo("n0", host="h", pid=7, started=started).encode())
        etcd.put(keys.node("n0"), NodeInfo("n0", host="h", pid=7, started=started, health="no GPU").encode())
    finally:
        etcd.close()
    got = events(etcd_endpoint, run_id, "--json")
    history = {e["event"]: e for e in map(json.loads, got.stdout.splitlines())}
    assert history["node registered"]["time"] == started
    assert history["node unhealthy"]["time"] is None and history["node unhealthy"]["health"] == "no GPU"
