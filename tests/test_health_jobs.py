"""The health gate and quarantine in real jobs: an unhealthy node stays out until its check passes, a node that
keeps failing is quarantined and the job finishes on the rest, a slow check or a forged registration costs at most
one scale-up, and when every node is unhealthy the join timeout fails the job naming them."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from agents import keys_of, start_agents, until_recorded, wait_all, wait_logged, watch_until
from etcd_agent.config import QuarantinePolicy
from etcd_agent.coord import quarantine
from etcd_agent.errors import ConfigError
from etcd_agent.schema.values import NodeInfo


COMMAND_WAIT = 120  # seconds a status or events command may take on a loaded machine: a bound, not what is tested


def registered(endpoint: str, run_id: str, node: str, holds, what: str) -> NodeInfo:
    """The node's registry entry once ``holds(entry)``, watched in etcd."""
    key = keys_of(run_id).node(node)

    def entry(keys: dict) -> NodeInfo | None:
        info = NodeInfo.from_json(key, json.loads(keys[key])) if key in keys else None
        return info if info is not None and holds(info) else None
    return watch_until(endpoint, key, entry, 30, what)


# --- a real job ------------------------------------------------------------------------------------------------

def test_an_unhealthy_node_stays_out_until_its_check_passes(etcd_endpoint, run_id, tmp_path):
    """node-1's check fails until a file exists: node-0 runs the job alone, status and events say why node-1 is out;
    once the check passes node-1 joins (a scale-up) and both finish."""
    healthy_flag, release = tmp_path / "node-1-healthy", tmp_path / "release"
    code = f"import os, sys; os.path.exists({str(healthy_flag)!r}) or sys.exit('GPU 0 is lost')"
    check = f"{sys.executable} -c \"{code}\""
    first, out = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                              nnodes="1:2")
    second, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                             nnodes="1:2", first=1, extra=["--health-check", check])
    agents = first + second
    base = [sys.executable, "-m", "etcd_agent"]
    ep = ["--etcd-endpoints", etcd_endpoint, "--run-id", run_id]

    def status() -> str:
        return subprocess.run(base + ["status", *ep], capture_output=True, text=True, timeout=COMMAND_WAIT).stdout
    until_recorded(out, lambda found: (1, 0) in found, "node-0 running round 1 alone", agents)
    registered(etcd_endpoint, run_id, "node-1", lambda info: info.health, "node-1 registered as unhealthy")
    shown = status()
    assert "round 1: running (1 node(s): node-0)" in shown
    assert "unhealthy, not joining: node-1: --health-check" in shown and "exit code 1: GPU 0 is lost" in shown
    healthy_flag.touch()
    # the next check passed: the job scaled up to both nodes
    until_recorded(out, lambda found: (2, 1) in found, "node-1 running rank 1 in round 2", agents)
    release.touch()
    assert wait_all(agents) == [0, 0], [a.stderr()[-2000:] for a in agents]
    err = second[0].stderr()
    assert err.count("this node is unhealthy and does not join") == 1  # said once, however many checks failed
    assert "passed its health check after" in err
    events = subprocess.run(base + ["events", *ep], capture_output=True, text=True, timeout=COMMAND_WAIT).stdout
    unhealthy = re.search(r"  node unhealthy +node-1 +does not join: --health-check", events)
    healthy = re.search(r"  node healthy +node-1 +passed its health check: it joins again", events)
    joined = re.search(r"  joined round +node-1 +round ", events)
    assert unhealthy and healthy and joined, events
    assert unhealthy.start() < healthy.start() < joined.start()


# --- quarantine ------------------------------------------------------------------------------------------------

def test_the_kth_failure_within_the_window_starts_a_cooldown():
    policy = QuarantinePolicy(after=3, window=100.0, cooldown=50.0)
    q = quarantine.record_failure(None, "n2", 10.0, policy, 10.0)
    assert q.failures == (10.0,) and not q.until
    q = quarantine.record_failure(q, "n2", 20.0, policy, 20.0)
    assert quarantine.quarantined(q, 20.0) == ""
    late = quarantine.record_failure(q, "n2", 200.0, policy, 200.0)  # the first two fell out of the window
    assert late.failures == (200.0,) and not late.until
    q = quarantine.record_failure(q, "n2", 30.0, policy, 30.0)
    assert q.until == 80.0 and q.failures == ()
    assert "3 worker failure(s) within 100 s (--quarantine-after 3)" in q.reason
    assert quarantine.quarantined(q, 79.0).startswith("quarantined until ") and quarantine.quarantined(q, 80.0) == ""


def test_quarantine_flags_are_checked():
    assert not QuarantinePolicy().active and QuarantinePolicy(after=2).active
    with pytest.raises(ConfigError, match="--quarantine-after must be 0"):
        QuarantinePolicy(after=-1)
    with pytest.raises(ConfigError, match="--quarantine-window and --quarantine-cooldown must be positive"):
        QuarantinePolicy(after=2, cooldown=0)


def test_a_node_that_keeps_failing_is_quarantined_and_the_job_finishes_on_the_rest(etcd_endpoint, run_id, tmp_path):
    """node-2's workers fail in every round: after its second failure it quarantines itself, the two others re-form
    at once without it (its restarts stop there) and finish; status and events say it sat out and until when."""
    release = tmp_path / "release"
    extra = ["--max-restarts", "5", "--quarantine-after", "2", "--quarantine-cooldown", "600"]
    good, out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                             nnodes="2:3", extra=extra)
    bad, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--always-fail"], nproc=1, nnodes="2:3", first=2,
                          extra=extra)
    until_recorded(out, lambda found: len([k for k in found if k[0] == 3]) == 2, "round 3 running on two nodes",
                   good, timeout=60)
    base = [sys.executable, "-m", "etcd_agent"]
    ep = ["--etcd-endpoints", etcd_endpoint, "--run-id", run_id]
    shown = subprocess.run(base + ["status", *ep], capture_output=True, text=True, timeout=COMMAND_WAIT).stdout
    assert "round 3: running (2 node(s): " in shown and "node-2" not in shown.split("round 3: running")[1].split(")")[0]
    assert "restarts: 2 of 5 used" in shown
    assert "quarantined: node-2 until " in shown
    assert "(2 worker failure(s) within 600 s (--quarantine-after 2))" in shown
    assert "unhealthy, not joining: node-2: quarantined until " in shown
    release.touch()
    # the quarantined agent is still one of the job's: it leaves with the others when the job ends
    assert wait_all(good + bad) == [0, 0, 0], [a.stderr()[-2000:] for a in good + bad]
    assert "this node is unhealthy and does not join: quarantined until " in bad[0].stderr()
    events = subprocess.run(base + ["events", *ep], capture_output=True, text=True, timeout=COMMAND_WAIT).stdout
    assert re.search(r"  quarantined +node-2 +until ", events), events
    assert re.search(r"  node unhealthy +node-2 +does not join: ", events), events
    assert re.search(r"  result +- +succeeded in round 3", events), events


# --- a slow check, a forged registration: no endless scale-ups ----------------------------------------------------

def _events(etcd_endpoint: str, run_id: str) -> list[dict]:
    import json

    done = subprocess.run([sys.executable, "-m", "etcd_agent", "events", "--etcd-endpoints", etcd_endpoint,
                           "--run-id", run_id, "--json"], capture_output=True, text=True, timeout=COMMAND_WAIT)
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _scale_ups(etcd_endpoint: str, run_id: str) -> list[dict]:
    return [e for e in _events(etcd_endpoint, run_id)
            if e.get("event") == "round opened" and "(scale-up)" in e.get("reason", "")]


def test_a_newcomer_whose_passing_check_outlasts_the_last_call_joins_after_one_scale_up(etcd_endpoint, run_id,
                                                                                          tmp_path):
    """A 1:2 job runs on node-0; node-1 comes with a passing check that takes at least 3 s (node-0's last call is
    1 s) and lasts until the test has seen it in status. It is counted only once the check passed: one scale-up
    takes it in, and the workers are not restarted for it again and again.

    node-1's own last call is long: when it joins the scale-up round first it leads it, and node-0 joins only once
    its worker stopped, which on a loaded machine can take longer than 1 s (the round would close without node-0,
    and a second scale-up take it back in)."""
    release = tmp_path / "release"
    passes = tmp_path / "check-passes"  # the check passes once this exists: after status showed it running
    script = tmp_path / "check.py"
    script.write_text("import sys, time\nfrom etcd_agent.testing import records\n\n"
                      "time.sleep(3)\nrecords.wait_path(sys.argv[1])\n")  # the check's own length: what is tested
    check = f"{sys.executable} {script} {passes}"
    first, out = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                              nnodes="1:2")
    until_recorded(out, lambda found: (1, 0) in found, "node-0 running round 1 alone", first)
    second, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                             nnodes="1:2", first=1,
                             extra=["--health-check", check, "--health-check-timeout", "600", "--last-call", "60"])
    status = [sys.executable, "-m", "etcd_agent", "status", "--etcd-endpoints", etcd_endpoint, "--run-id", run_id]
    registered(etcd_endpoint, run_id, "node-1", lambda info: info.checking, "node-1 registered as checking")
    shown = subprocess.run(status, capture_output=True, text=True, timeout=COMMAND_WAIT).stdout
    assert "checking its health, not joining yet: node-1" in shown, shown
    passes.touch()
    joined = until_recorded(out, lambda found: [k for k in found if k[1] == 1], "node-1 running as rank 1",
                            first + second, timeout=60)
    release.touch()
    assert wait_all(first + second) == [0, 0], [a.stderr()[-2000:] for a in first + second]
    scale_ups = _scale_ups(etcd_endpoint, run_id)
    assert 1 <= len(scale_ups) <= 2, scale_ups
    assert joined[0][0] <= 3


def test_a_forged_registration_costs_at_most_one_scale_up(etcd_endpoint, run_id, tmp_path):
    """A registry entry on a live lease that no agent stands behind (it never joins): the leader scales up for it
    once, says it was passed over, and never again; a real newcomer after it still gets in."""
    from etcd_agent.config import EtcdConfig
    from etcd_agent.endpoints import parse_endpoints
    from etcd_agent.etcd.client import Etcd

    release = tmp_path / "release"
    first, out = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                              nnodes="1:3")
    until_recorded(out, lambda found: (1, 0) in found, "node-0 running round 1 alone", first)
    etcd = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
    try:
        lease = etcd.lease_grant(300)
        etcd.put(keys_of(run_id).node("node-x"), NodeInfo("node-x", "nowhere", "10.9.9.9", 1).encode(), lease)
        said = "node-x was not taken into round 2, the scale-up made for it; the job does not scale up for it again"
        wait_logged(first[0], said)
        second, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                                 nnodes="1:3", first=1)
        until_recorded(out, lambda found: [k for k in found if k[1] == 1], "node-1 running as rank 1",
                       first + second, timeout=60)
        scale_ups = _scale_ups(etcd_endpoint, run_id)
        release.touch()
        assert wait_all(first + second) == [0, 0], [a.stderr()[-2000:] for a in first + second]
    finally:
        etcd.close()
    assert [e["reason"] for e in scale_ups] == ["node(s) node-x can join (scale-up)",
                                                "node(s) node-1 can join (scale-up)"]
    assert first[0].stderr().count("node-x was not taken into round") == 1


def test_when_every_node_is_unhealthy_the_join_timeout_fails_the_job_naming_them(etcd_endpoint, run_id, tmp_path):
    """Nobody can join: the join timeout still fires, counted from the round's start, and the job fails naming
    each unhealthy node and why; the wait lines say when the round times out."""
    check = f"{sys.executable} -c \"import sys; sys.exit('GPU 0 is lost')\""
    agents, _ = start_agents(2, etcd_endpoint, run_id, tmp_path, [], nproc=1,
                             extra=["--health-check", check, "--join-timeout", "3"])
    assert [a.wait(60) for a in agents] == [1, 1], [a.stderr()[-2000:] for a in agents]
    err = agents[0].stderr() + agents[1].stderr()
    assert "rendezvous timed out: 0 of at least 2 node(s) joined round 1 within 3 s (--join-timeout); missing: " \
           "node-0 (unhealthy: --health-check" in err
    assert "node-1 (unhealthy: --health-check" in err and "failed with exit code 1: GPU 0 is lost" in err
    assert any("checks again" in line and "the round times out in " in line for line in err.splitlines())
