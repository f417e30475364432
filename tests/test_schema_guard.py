"""Keys the schema does not name, and keys that are there for no member: planted in a running job's prefix, they
are ignored (with one warning) and never stall, restart or end the job; an --etcd-prefix nested in another run is
refused before it writes anything. A bad value in a key the schema names holds an agent until the key is repaired
(its repair or deletion reaches the agent whatever it watches) or the job is stopped; a deleted quarantine key lets
its node in at once."""

from __future__ import annotations

import subprocess
import sys

from agents import (JOB, job_keys, keys_of, records, start_agents, wait_all, wait_for_key, wait_logged,
                    wait_records)
from etcd_agent.config import EtcdConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.etcd.client import Etcd


def put(endpoint: str, key: str, value: bytes = b'{"v": 1}') -> None:
    etcd = Etcd(EtcdConfig(parse_endpoints(endpoint)))
    try:
        etcd.put(key, value)
    finally:
        etcd.close()


def test_keys_outside_the_schema_do_not_stall_a_job(etcd_endpoint, run_id, tmp_path):
    release = tmp_path / "release"
    agents, out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--fail-rank", "1", "--fail-when",
                               str(tmp_path / "crash"), "--run-until", str(release)], nproc=1,
                               extra=["--max-restarts", "1"])
    wait_records(out, {(1, 0), (1, 1)}, agents)
    k = keys_of(run_id)
    # three keys below round 2's joins, older than any join: a join txn's read-back of the oldest (two) holds no join
    # key, so the joiner finds the leader with the longer read (``txns.leader``)
    for key in (k.nodes() + "x/y", k.joins(1) + "a/b", k.joins(2) + "a/b", k.joins(2) + "c/d", k.joins(2) + "e/f",
                k.round_dir(1) + "junk", k.prefix + "unknown"):
        put(etcd_endpoint, key)
    (tmp_path / "crash").touch()  # the job must still restart on the crash, with the junk in round 1 and 2
    wait_records(out, {(2, 0), (2, 1)}, agents)
    release.touch()
    assert wait_all(agents) == [0, 0], [a.stderr()[-2000:] for a in agents]
    assert ["joined round 2 (nobody leads it)" in a.stderr() for a in agents] == [True, True]  # then the longer read
    for key in (k.nodes() + "x/y", k.joins(2) + "a/b"):
        said = [a.stderr().count(f"ignoring {key}: not a key of the etcd-agent schema") for a in agents]
        assert max(said) == 1, said  # one warning per agent that reads it (the leader, at least), never a flood


def test_a_prefix_inside_a_running_job_is_refused(etcd_endpoint, run_id, tmp_path):
    release = tmp_path / "release"
    agents, out = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1)
    wait_records(out, {(1, 0)}, agents)
    inside = keys_of(run_id).prefix.rstrip("/")  # /etcd-agent/<run>/0001
    got = subprocess.run([sys.executable, "-m", "etcd_agent", "--etcd-endpoints", etcd_endpoint, "--etcd-prefix",
                          inside, "--run-id", "intruder", "--nnodes", "1", JOB, str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert got.returncode == 2, got.stderr
    assert f"--etcd-prefix {inside}: run intruder would live inside the run at /etcd-agent/{run_id}/" in got.stderr
    assert not any("intruder" in key for key in job_keys(etcd_endpoint, run_id))  # nothing was written
    release.touch()
    assert wait_all(agents) == [0]
    assert records(out).keys() == {(1, 0)}


def test_keys_for_no_member_change_nothing(etcd_endpoint, run_id, tmp_path):
    """An unleased registry entry (no live agent's) does not make a MIN:MAX job scale up forever; an exit key and a
    failure report of a node outside the plan neither end the job at the next crash nor block its restart."""
    release, crash = tmp_path / "release", tmp_path / "crash"
    agents, out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--fail-rank", "1", "--fail-when", str(crash),
                               "--run-until", str(release)], nproc=1, nnodes="2:3",
                               extra=["--max-restarts", "1", "--scale-settle", "0.2"])
    wait_records(out, {(1, 0), (1, 1)}, agents)
    k = keys_of(run_id)
    put(etcd_endpoint, k.node("ghost"), b'{"v": 1, "node": "ghost"}')
    put(etcd_endpoint, k.exit(1, "ghost"), b'{"v": 1, "node": "ghost", "outcome": "succeeded"}')
    put(etcd_endpoint, k.failure(1, "ghost"), b'{"v": 1, "node": "ghost", "rank": 9, "time": 0}')
    crash.touch()
    wait_records(out, {(2, 0), (2, 1)}, agents)
    release.touch()
    assert wait_all(agents) == [0, 0], [a.stderr()[-2000:] for a in agents]
    state = job_keys(etcd_endpoint, run_id)
    assert state[k.result()]["outcome"] == "succeeded" and state[k.result()]["round"] == 2  # no scale-up loop
    assert state[k.restarts()]["used"] == 1
    assert k.exit(1, "ghost") not in state  # deleted so that the restart's guard could pass
    logs = "".join(a.stderr() for a in agents)
    assert "a registry entry without a lease is no live agent's" in logs
    assert "an exit key of a node outside round 1's plan" in logs


def test_status_and_stop_work_while_the_round_key_is_corrupt(etcd_endpoint, run_id, tmp_path):
    """A round key overwritten by hand holds the agents (they keep their workers and wait for it to be fixed);
    ``status`` still shows the job and names the bad key, and ``stop`` ends the job and replaces the key."""
    from agents import wait_for_key

    release = tmp_path / "release"
    agents, _out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)])
    k = keys_of(run_id)
    wait_for_key(etcd_endpoint, k.plan(1))
    put(etcd_endpoint, k.round(), b'{"v": 1, "round": "one", "phase": "running"}')
    base = [sys.executable, "-m", "etcd_agent"]
    ep = ["--etcd-endpoints", etcd_endpoint, "--run-id", run_id]
    status = subprocess.run(base + ["status", *ep], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert f"unreadable: bad data in etcd key {k.round()}: round must be a whole number, not 'one'" in status.stdout
    assert "plan: 2 node(s), 4 worker(s)" in status.stdout and status.stdout.count(", alive") == 2, status.stdout
    assert status.stdout.splitlines()[1].startswith("  unreadable: ")  # said first: it is why the job is held
    stop = subprocess.run(base + ["stop", *ep, "--reason", "key repair"], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert f"{k.round()}: round must be a whole number" in stop.stderr and "ending the job in round 1" in stop.stderr
    assert wait_all(agents) == [1, 1], [a.stderr()[-2000:] for a in agents]
    assert all("stopped: key repair" in a.stderr() for a in agents)
    keys = job_keys(etcd_endpoint, run_id)
    assert keys[k.round()]["round"] == 1 and keys[k.round()]["phase"] == "stopped"
    assert keys[k.result()]["outcome"] == "stopped" and keys[k.result()]["round"] == 1
    after = subprocess.run(base + ["status", *ep], capture_output=True, text=True, timeout=120)
    assert "unreadable" not in after.stdout and "result: stopped in round 1: key repair" in after.stdout


def delete(endpoint: str, key: str) -> None:
    etcd = Etcd(EtcdConfig(parse_endpoints(endpoint)))
    try:
        etcd.delete_range(key)
    finally:
        etcd.close()


def raw_keys(endpoint: str, prefix: str) -> set[str]:
    etcd = Etcd(EtcdConfig(parse_endpoints(endpoint)))
    try:
        return {kv.key for kv in etcd.get_prefix(prefix)[0]}
    finally:
        etcd.close()


def _members(endpoint: str, run_id: str, rnd: int) -> list[str]:
    """The plan's members of round ``rnd`` in group-rank order (the first one leads the first round)."""
    from agents import plan_nodes

    return plan_nodes(job_keys(endpoint, run_id), keys_of(run_id).plan(rnd))


def _failing_non_leader(etcd_endpoint, run_id, tmp_path):
    """Two agents of one worker each, --max-restarts 1; the worker of group rank 1 (not the leader) fails once the
    file ``crash`` exists. Returns the agents, their output folder, the release file and round 1's members."""
    release = tmp_path / "release"
    agents, out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--fail-rank", "1", "--fail-when",
                               str(tmp_path / "crash"), "--run-until", str(release)], nproc=1,
                               extra=["--max-restarts", "1"])
    wait_records(out, {(1, 0), (1, 1)}, agents)
    return agents, out, release, _members(etcd_endpoint, run_id, 1)


def test_junk_under_a_rounds_exits_and_failures_blocks_no_restart(etcd_endpoint, run_id, tmp_path):
    """A key nested under the round's exits (``exit/a/b``) and a failure key of a node outside the plan with a
    value that is no failure report: the failing non-leader still restarts the job (the junk under the exits is
    deleted like an exit key of a node outside the plan), spending one restart, and nobody is held."""
    agents, out, release, _ = _failing_non_leader(etcd_endpoint, run_id, tmp_path)
    k = keys_of(run_id)
    nested, ghost = k.exits(1) + "a/b", k.failure(1, "ghost")
    put(etcd_endpoint, nested)
    put(etcd_endpoint, ghost, b"garbage")
    (tmp_path / "crash").touch()
    wait_records(out, {(2, 0), (2, 1)}, agents)
    release.touch()
    assert wait_all(agents) == [0, 0], [a.stderr()[-2000:] for a in agents]
    assert raw_keys(etcd_endpoint, k.rounds()) >= {ghost} and nested not in raw_keys(etcd_endpoint, k.rounds())
    delete(etcd_endpoint, ghost)  # ignored, not deleted: gone only so that the job's keys can be read as JSON
    state = job_keys(etcd_endpoint, run_id)
    assert state[k.result()]["outcome"] == "succeeded" and state[k.result()]["round"] == 2
    assert state[k.restarts()]["used"] == 1
    logs = "".join(a.stderr() for a in agents)
    assert f"ignoring {nested}: not a key of the etcd-agent schema" in logs
    assert f"ignoring {ghost}: a failure report of a node outside round 1's plan" in logs
    assert "bad data" not in logs and "leaving the workers as they are" not in logs


def _held_non_leader(etcd_endpoint, run_id, tmp_path):
    """A bad value in the leader's failure key (holds the leader at once) and junk under the exits (the failing
    non-leader's restart fails its compare, so it re-reads the round's failures and is held too)."""
    agents, out, release, members = _failing_non_leader(etcd_endpoint, run_id, tmp_path)
    k = keys_of(run_id)
    bad = k.failure(1, members[0])
    put(etcd_endpoint, k.exits(1) + "a/b")
    put(etcd_endpoint, bad, b"garbage")
    (tmp_path / "crash").touch()
    follower = next(a for a in agents if a.node == members[1])
    wait_logged(follower, f"bad data in etcd key {bad}")  # the non-leader is held
    return agents, out, release, bad


def test_an_agent_held_by_a_key_it_does_not_watch_sees_its_deletion(etcd_endpoint, run_id, tmp_path):
    agents, out, release, bad = _held_non_leader(etcd_endpoint, run_id, tmp_path)
    delete(etcd_endpoint, bad)  # the repair: the non-leader watches the round's failures only while held by one
    wait_records(out, {(2, 0), (2, 1)}, agents)
    release.touch()
    assert wait_all(agents) == [0, 0], [a.stderr()[-2000:] for a in agents]
    assert job_keys(etcd_endpoint, run_id)[keys_of(run_id).restarts()]["used"] == 1


def test_stop_reaches_agents_held_by_a_bad_key(etcd_endpoint, run_id, tmp_path):
    agents, _out, _release, bad = _held_non_leader(etcd_endpoint, run_id, tmp_path)
    stop = subprocess.run([sys.executable, "-m", "etcd_agent", "stop", "--etcd-endpoints", etcd_endpoint, "--run-id",
                           run_id, "--reason", "bad key"], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert wait_all(agents) == [1, 1], [a.stderr()[-2000:] for a in agents]
    assert all("stopped: bad key" in a.stderr() for a in agents)


def test_deleting_a_quarantine_key_lets_its_node_in_at_once(etcd_endpoint, run_id, tmp_path):
    """--quarantine-after 1 with a 600 s cooldown: the node whose worker failed in round 1 sits out round 2; an
    operator deletes its quarantine key and the running job takes it in (a scale-up), not 600 s later."""
    release = tmp_path / "release"
    agents, out = start_agents(3, etcd_endpoint, run_id, tmp_path, ["--fail-rank", "2", "--run-until", str(release)],
                               nproc=1, nnodes="2:3", extra=["--max-restarts", "3", "--quarantine-after", "1",
                                                             "--quarantine-cooldown", "600", "--scale-settle", "0.2",
                                                             "--last-call", "30"])
    wait_records(out, {(1, 0), (1, 1), (1, 2)}, agents)
    bad = _members(etcd_endpoint, run_id, 1)[2]
    key = keys_of(run_id).quarantine(bad)
    wait_records(out, {(2, 0), (2, 1)}, agents)
    assert wait_for_key(etcd_endpoint, key)["until"] > 0
    assert bad not in _members(etcd_endpoint, run_id, 2)
    delete(etcd_endpoint, key)
    wait_records(out, {(3, 0), (3, 1), (3, 2)}, agents)
    assert bad in _members(etcd_endpoint, run_id, 3)
    release.touch()
    assert wait_all(agents) == [0, 0, 0], [a.stderr()[-2000:] for a in agents]
    held = next(a for a in agents if a.node == bad)
    assert f"{key} was deleted while it held this node out; checking again whether it may join" in held.stderr()
