"""Warm restarts and priority: a waiting spare is SCHED_IDLE and the worker it becomes runs at the agent's
priority, a spare whose priority cannot be given back is not used, an agent that cannot leave SCHED_IDLE keeps its
spares at normal priority; a worker that crashes in its first second restarts warm, and a spare whose preload hangs
starts its worker cold."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from agents import AgentProc, poll_until, until_recorded, records
from etcd_agent.node import priority, warm
from etcd_agent.node.warm import REFILL_DELAY, SPARE_FILE, known_env
from warm_spares import JOB, _assignment, _first_envs, _group_with_pool, _spares_of, _standalone


# --- priority: idle spares, the agent's priority at the handoff ------------------------------------------------
# A worker that records, at its first line, its pid, parent, command line (a warm one shows spare.py) and the CPU and
# I/O priority of each of its threads; rank 1 exits 1 in the rounds given after OUT, the other ranks of those rounds
# wait to be stopped; in any other round every rank exits 0.
PRIO_WORKER = """\
import json, os, signal, sys
from etcd_agent.node import priority
out, fail_rounds = sys.argv[1], {int(r) for r in sys.argv[2:]}
rnd, rank = int(os.environ["ETCD_AGENT_ROUND"]), int(os.environ["RANK"])
tids = sorted(int(t) for t in os.listdir("/proc/self/task"))
rec = {"pid": os.getpid(), "ppid": os.getppid(), "cmdline": open("/proc/self/cmdline", "rb").read().decode(),
       "policies": [os.sched_getscheduler(t) for t in tids],
       "nices": [os.getpriority(os.PRIO_PROCESS, t) for t in tids],
       "ioprios": [priority.ioprio_get(t) for t in tids], "autogroup": priority.autogroup_nice(os.getpid())}
with open(os.path.join(out, f"{rnd}-{rank}.json.tmp"), "w") as f:
    json.dump(rec, f)
os.replace(os.path.join(out, f"{rnd}-{rank}.json.tmp"), os.path.join(out, f"{rnd}-{rank}.json"))
if rnd in fail_rounds:
    if rank == 1:
        # Fail only once rank 0 has written its record: the agent stops rank 0 as soon as rank 1 fails, and a
        # fast restart can stop it before its first line ran.
        from etcd_agent.testing import records
        records.wait_path(os.path.join(out, f"{rnd}-0.json"), timeout=30)
        sys.exit(1)
    signal.pause()
"""
# A --preload module that starts a thread at import, as torch does: every thread of a spare is idle, and every thread
# of the worker it becomes gets the agent's priority back.
THREADED_PRELOAD = "import threading\nthreading.Thread(target=threading.Event().wait, daemon=True).start()\n"
IDLE_OK = priority.probe()
needs_idle = pytest.mark.skipif(bool(IDLE_OK), reason=f"this test process cannot leave SCHED_IDLE: {IDLE_OK}")


def _priority_of(pid: int) -> dict:
    """The scheduling policy, nice and I/O priority of every thread of ``pid``, and its autogroup's nice."""
    tids = priority.threads(pid)
    return {"policies": [os.sched_getscheduler(t) for t in tids], "nices": [os.getpriority(os.PRIO_PROCESS, t)
                                                                           for t in tids],
            "ioprios": [priority.ioprio_get(t) for t in tids], "autogroup": priority.autogroup_nice(pid)}


def _assert_agents_priority(rec: dict, agent: priority.Priority, what: str) -> None:
    n = len(rec["policies"])
    assert rec["policies"] == [agent.policy] * n, f"{what}: policies {rec['policies']}"
    assert rec["nices"] == [agent.nice] * n, f"{what}: nice {rec['nices']}"
    assert rec["ioprios"] == [agent.ioprio] * n, f"{what}: I/O priorities {rec['ioprios']}"
    assert rec["autogroup"] in (None, priority.AUTOGROUP_NEW_NICE), f"{what}: autogroup nice {rec['autogroup']}"


def _prio_group(tmp_path: Path, out: Path, monkeypatch, fail_rounds=()):
    script = tmp_path / "prio_worker.py"
    script.write_text(PRIO_WORKER)
    mods = tmp_path / "mods"
    mods.mkdir(exist_ok=True)
    (mods / "threaded_preload.py").write_text(THREADED_PRELOAD)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(mods), os.environ.get("PYTHONPATH", "")]))
    return _group_with_pool(tmp_path, str(script), [str(out), *map(str, fail_rounds)], preload=("threaded_preload",))


@needs_idle
def test_a_waiting_spare_is_idle_and_the_worker_it_becomes_runs_at_the_agents_priority(tmp_path, monkeypatch):
    """The first spares (the agent waits for them) run at normal priority; those started once a round started run
    at SCHED_IDLE and the idle I/O class, every thread; the worker such a spare becomes runs, from its first line,
    every thread at the agent's own policy, nice and I/O priority."""
    out = tmp_path / "out"
    out.mkdir()
    cfg, pool, group, exits, done = _prio_group(tmp_path, out, monkeypatch)
    agent = priority.own()
    try:
        pool.fill(_first_envs(cfg))
        pool.wait_ready(60)
        first = pool.pids[0]
        assert set(_priority_of(first)["policies"]) == {agent.policy}
        group.start(_assignment(cfg))
        assert group.pids == [first]
        spare = pool.pids.get(0)  # the round's start started the next round's spare, at once
        assert spare is not None and spare != first and pool.due is None
        assert done.wait(30) and exits[0].returncode == 0
        group.stop("round over")
        pool.wait_ready(60)
        waiting = _priority_of(spare)
        assert len(waiting["policies"]) >= 2, "the preload's thread is missing"
        assert waiting["policies"] == [os.SCHED_IDLE] * len(waiting["policies"]), waiting
        assert waiting["ioprios"] == [priority.IDLE_IOPRIO] * len(waiting["ioprios"]), waiting
        assert waiting["autogroup"] in (None, priority.AUTOGROUP_IDLE_NICE), waiting
        exits.clear()
        done.clear()
        group.start(_assignment(cfg, 2))
        assert group.pids == [spare] and pool.handed == 2
        assert done.wait(30) and exits[0].returncode == 0
        rec = records(out)[(2, 0)]
        assert rec["pid"] == spare and SPARE_FILE in rec["cmdline"]
        _assert_agents_priority(rec, agent, "the warm worker at its first line")
    finally:
        group.stop("test over")
        pool.close()


@needs_idle
def test_a_spare_whose_priority_cannot_be_given_back_is_not_used(tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    out.mkdir()
    cfg, pool, group, exits, done = _prio_group(tmp_path, out, monkeypatch)
    try:
        pool.due = time.monotonic()
        pool._known[0] = known_env(_first_envs(cfg)[0])  # what take() leaves behind after a round
        pool.fill()
        spare = pool.pids[0]
        assert _priority_of(spare)["policies"][0] == os.SCHED_IDLE

        def refuse(pid, prio):
            raise PermissionError(1, "Operation not permitted")
        monkeypatch.setattr(warm.priority, "restore", refuse)
        caplog.set_level("INFO", logger="etcd_agent.node.warm")
        group.start(_assignment(cfg))
        assert group.pids != [spare] and pool.handed == 0
        assert (f"the warm spare for local rank 0 (pid {spare}) could not be given the agent's CPU and I/O priority "
                "back ([Errno 1] Operation not permitted); the worker starts cold") in caplog.text
        assert not psutil.pid_exists(spare) or psutil.Process(spare).status() == psutil.STATUS_ZOMBIE
        assert done.wait(30) and exits[0].returncode == 0
        assert SPARE_FILE not in records(out)[(1, 0)]["cmdline"]
    finally:
        group.stop("test over")
        pool.close()


def test_an_agent_that_cannot_leave_sched_idle_keeps_spares_at_normal_priority_and_starts_them_later(
        tmp_path, monkeypatch, caplog):
    """The probe failed (forced here): one log line says why; spares run at normal priority and the next ones are
    due REFILL_DELAY s after a round started, as before idle spares."""
    monkeypatch.setattr(warm.priority, "probe", lambda: "forced for the test")
    out = tmp_path / "out"
    out.mkdir()
    caplog.set_level("INFO", logger="etcd_agent.node.warm")
    cfg, pool, group, exits, done = _prio_group(tmp_path, out, monkeypatch)
    try:
        assert ("warm spares run at normal priority and start 5 s after each round started, because this agent "
                "cannot give a process its priority back after SCHED_IDLE: forced for the test") in caplog.text
        pool.fill(_first_envs(cfg))
        before = time.monotonic()
        group.start(_assignment(cfg))
        assert pool.due is not None and pool.due >= before + REFILL_DELAY  # the deadline set, not a time measured
        assert done.wait(30) and exits[0].returncode == 0
        group.stop("round over")
        pool.fill()
        assert set(_priority_of(pool.pids[0])["policies"]) == {priority.own().policy}
    finally:
        group.stop("test over")
        pool.close()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("prlimit"),
                    reason="needs root, setpriv and prlimit to run the probe as an unprivileged user")
def test_the_probe_says_what_an_unprivileged_agent_lacks():
    """The real probe, run as nobody without capabilities and with RLIMIT_NICE 0 (most systems' default)."""
    code = "from etcd_agent.node import priority; print(priority.probe())"
    res = subprocess.run(["prlimit", "--nice=0", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == ("leaving SCHED_IDLE needs CAP_SYS_NICE or an RLIMIT_NICE of at least 20 (ulimit -e; "
                                  "it is 0): Operation not permitted")


@needs_idle
def test_a_worker_that_crashes_in_its_first_second_restarts_warm(etcd_endpoint, run_id, tmp_path):
    """1 node x 2 with --warm-restart on a real etcd: rank 1 exits 1 as soon as rank 0 has started, in round 1 and in
    round 2. The spares for the next round start as soon as a round does (not 5 s later), so rounds 2 and 3 run
    entirely in them: every worker is a child of the agent running spare.py that no earlier round used, and it runs
    at the agent's priority from its first line."""
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "prio_worker.py"
    script.write_text(PRIO_WORKER)
    agent = AgentProc(etcd_endpoint, run_id, "node-0", tmp_path, [str(out), "1", "2"], nproc=2,
                      extra=["--warm-restart", "--preload", "json", "--max-restarts", "2"], entry=str(script))
    assert agent.wait(120) == 0, agent.stderr()[-3000:]
    found = records(out)
    assert sorted(found) == [(r, k) for r in (1, 2, 3) for k in (0, 1)], agent.stderr()[-3000:]
    err = agent.stderr()
    assert err.count("2 of them warm") == 3, err[-3000:]
    mine = priority.own()  # the agent's, which it inherited from this test
    for rnd in (2, 3):
        earlier = {found[(r, k)]["pid"] for r in range(1, rnd) for k in (0, 1)}
        for rank in (0, 1):
            rec = found[(rnd, rank)]
            assert SPARE_FILE in rec["cmdline"] and rec["ppid"] == agent.proc.pid, (rnd, rank, rec["cmdline"])
            assert rec["pid"] not in earlier
            _assert_agents_priority(rec, mine, f"round {rnd} rank {rank}")
    assert "could not be given the agent's CPU and I/O priority back" not in err


# A --preload module whose second import hangs (as an import stuck on a lock or a network file system would): the
# spares started with the agent import it fine, the next round's spare never finishes.
HANG_ON_SECOND_IMPORT = """import os, threading
with open({count!r}, "a") as f:
    f.write("imported\\n")
with open({count!r}) as f:
    if len(f.read().splitlines()) >= 2:
        threading.Event().wait()
"""


@needs_idle
def test_a_spare_whose_preload_hangs_starts_its_worker_cold_with_one_warning(tmp_path, monkeypatch):
    """1 node x 1, --warm-restart: round 1 runs in the spare started with the agent; the spare for round 2 hangs in
    its --preload import. Handed round 2 while still importing, it does not wait forever: after cold_after s it
    replaces itself (the same pid) with the cold worker, the agent says so once, and the job ends."""
    mods = tmp_path / "mods"
    mods.mkdir()
    count = tmp_path / "imports"
    (mods / "hang_second.py").write_text(HANG_ON_SECOND_IMPORT.format(count=str(count)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(mods), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    out.mkdir()
    go = tmp_path / "go"
    agent = _standalone(tmp_path, "w", [str(JOB), str(out), "--fail-rank", "0", "--fail-when", str(go)],
                        ["--warm-restart", "--preload", "hang_second"], nproc=1)
    until_recorded(out, lambda r: (1, 0) in r, "round 1", timeout=60)
    first = {r["pid"] for r in records(out).values()}
    spare = poll_until(lambda: _spares_of(agent, first).get(0), 60, "the spare for round 2")
    poll_until(lambda: count.exists() and len(count.read_text().splitlines()) == 2, 60, "its hanging import")
    go.touch()
    assert agent.wait(60) == 0, agent.stderr()[-3000:]
    second = records(out)[(2, 0)]
    assert second["pid"] == spare and second["env"]["ETCD_AGENT_ROUND"] == "2"
    err = agent.stderr()
    said = [line for line in err.splitlines() if "started the worker cold" in line]
    assert len(said) == 1 and re.match(r"\S+ W ", said[0]), err[-3000:]
    assert (f"the warm spare of worker rank 0 (pid {spare}) had not finished importing --preload "
            f"{warm.COLD_AFTER_MIN:.1f} s after it was handed the round; it started the worker cold") in said[0]
