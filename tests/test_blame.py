"""A node's loss is blamed on the lost node, never on a survivor (real etcd, real agents and workers on loopback).

The workers are tools/bench/worker.py's ``peer-loss`` mode: each exits 1 as soon as a peer's process is gone, as a
collective fails on a closed connection. node-2's agent is SIGKILLed (its workers die with it): a survivor's worker
failure restarts round 1 before node-2's lease ends, and round 1 must still be attributed to node-2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agents import AgentProc, keys_of, poll_until, wait_all
from etcd_agent.config import EtcdConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.etcd.client import Etcd

WORKER = str(Path(__file__).parent.parent / "tools" / "bench" / "worker.py")


def cli(endpoint: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "etcd_agent", *args, "--etcd-endpoints", endpoint],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def full_world(out: Path, world: int) -> bool:
    found = [json.loads(p.read_text()) for p in out.glob("*.json")]
    return len({r["rank"] for r in found if r["world_size"] == world}) == world


@pytest.mark.chaos
def test_a_killed_node_is_blamed_for_its_rounds_failure_and_no_survivor_is_quarantined(etcd_endpoint, run_id,
                                                                                       tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    extra = ["--lease-ttl", "3", "--max-restarts", "3", "--quarantine-after", "1", "--quarantine-cooldown", "600",
             "--last-call", "30"]
    agents = [AgentProc(etcd_endpoint, run_id, f"node-{i}", tmp_path, ["--out", str(out), "--mode", "peer-loss",
                                                                       "--world", "3"], nnodes="2:3", extra=extra,
                        entry=WORKER) for i in range(3)]
    poll_until(lambda: full_world(out, 3), 60, "the first full world did not start")
    agents[2].kill()  # SIGKILL: its workers die with it (parent-death signal)
    assert wait_all(agents[:2]) == [0, 0], [a.stderr()[-3000:] for a in agents[:2]]

    state = json.loads(cli(etcd_endpoint, "status", "--run-id", run_id, "--json"))
    loss = state["failures"]["1"]["node-2"]
    assert loss["lost"] and "node node-2 was lost: its lease ended" in loss["message"], state["failures"]
    assert state["causes"]["1"]["node"] == "node-2" and state["causes"]["1"]["lost"], state["causes"]
    assert state["restarts"]["used"] == 1 and state["result"]["outcome"] == "succeeded"
    assert state["quarantined"] == {}, state["quarantined"]
    text = cli(etcd_endpoint, "status", "--run-id", run_id)
    assert "cause, round 1: round 1's failure is attributed to node-2, lost (its lease ended " in text, text

    events = [json.loads(line) for line in cli(etcd_endpoint, "events", "--run-id", run_id, "--json").splitlines()]
    lost = [e for e in events if e["event"] == "node lost"]
    assert [(e["round"], e["node"]) for e in lost] == [(1, "node-2")], events

    etcd = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
    try:
        for node in ("node-0", "node-1"):  # no survivor's failure was counted toward its quarantine
            kv, _rev = etcd.get(keys_of(run_id).quarantine(node))
            assert kv is None or not json.loads(kv.value).get("failures"), (node, kv and kv.value)
    finally:
        etcd.close()
    said = "".join(a.stderr() for a in agents[:2])
    assert "round 1's failure is attributed to node-2, lost (its lease ended " in said, said[-4000:]
