"""Warm restarts (--warm-restart) with real agents: pre-started interpreters handed the next round,
indistinguishable from cold workers; spares that died are replaced cold and none outlives a SIGKILLed agent; a
--preload that cannot be imported is an error at start; hang detection holds for warm workers."""

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

from agents import WORKERS, CommandLine, poll_until, until_recorded, records, start_agents, wait_all
from etcd_agent.testing import procs
from warm_spares import JOB, _spares_of, _standalone


IDENTITY = WORKERS / "identity.py"


# --- real agents ---------------------------------------------------------------------------------------------


def _identity_run(tmp_path: Path, warm: bool, entry: list[str], cwd=None) -> tuple[dict, dict, CommandLine]:
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(tmp_path / "logs", ignore_errors=True)
    out.mkdir()
    go = tmp_path / "go"
    go.unlink(missing_ok=True)
    extra = ["--warm-restart", "--preload", "json"] if warm else []
    agent = _standalone(tmp_path, "warm" if warm else "cold", [*entry, str(out), "--go", str(go)], extra, cwd=cwd)
    until_recorded(out, lambda r: len([k for k in r if k[0] == 1]) == 2, "round 1's two workers", timeout=60)
    first = {r["pid"] for r in records(out).values()}
    spares = {}
    if warm:
        spares = poll_until(lambda: (s := _spares_of(agent, first)) and len(s) == 2 and s, 60, "the next spares")
    go.touch()
    assert agent.wait(60) == 0, agent.stderr()[-3000:]
    found = records(out)
    if warm:  # round 2 ran in the spares that waited for it
        assert {found[(2, r)]["pid"] for r in (0, 1)} == set(spares.values()), agent.stderr()[-3000:]
        assert "started 2 workers (ranks 0-1 of 2, pids" in agent.stderr() and "2 of them warm" in agent.stderr()
    stderr = (tmp_path / "logs" / "warm-test" / "job_0001" / "n0" / "round_0001" / "rank_1" / "stderr.log").read_text()
    return found, {"stderr_rank1_round1": stderr}, agent


def _normal(record: dict) -> dict:
    rec = json.loads(json.dumps(record))
    rec.pop("pid")
    rec["env"].pop("MASTER_PORT")  # a free port, chosen per round
    rec["fds"] = {fd: re.sub(r"/(cold|warm)/agent-n0-\d+\.out$", "/agent.out", t) for fd, t in rec["fds"].items()}
    return rec


@pytest.mark.parametrize("mode", ["script", "module"])
def test_a_warm_worker_sees_exactly_what_a_cold_worker_sees(tmp_path, mode):
    """The same job cold and with --warm-restart: every field the script records (sys.argv, __name__, __file__,
    its globals, sys.path[0] and sys.path, sys.orig_argv, the whole environment, signal handlers, process group,
    open descriptors, sys.flags, stdio), its traceback and its exit codes are the same, round by round."""
    if mode == "script":
        entry, cwd = [str(IDENTITY)], None
    else:
        mods = tmp_path / "mods"
        mods.mkdir()
        shutil.copy(IDENTITY, mods / "identity_mod.py")
        entry, cwd = ["-m", "identity_mod"], mods
    cold, cold_files, cold_agent = _identity_run(tmp_path, False, entry, cwd)
    warm, warm_files, warm_agent = _identity_run(tmp_path, True, entry, cwd)
    assert sorted(cold) == sorted(warm) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for key in sorted(cold):
        a, b = _normal(cold[key]), _normal(warm[key])
        for field in sorted(set(a) | set(b)):
            assert a.get(field) == b.get(field), f"round {key[0]} rank {key[1]}: {field} differs cold vs warm"
    assert cold[(2, 0)]["name"] == "__main__" and cold[(2, 0)]["main_is_this"]
    assert cold_files == warm_files
    assert "RuntimeError: rank 1 fails in round 1" in warm_files["stderr_rank1_round1"]
    assert "spare.py" not in warm_files["stderr_rank1_round1"]
    for agent in (cold_agent, warm_agent):
        assert "worker rank 1 (pid" in agent.stderr() and "failed with exit code 1" in agent.stderr()
        assert "rank 0 round 2: atexit ran" in agent.stdout() and "rank 1 round 2: atexit ran" in agent.stdout()


@pytest.mark.chaos
def test_a_spare_killed_before_use_is_replaced_cold(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    go = tmp_path / "go"
    agent = _standalone(tmp_path, "w", [str(JOB), str(out), "--fail-rank", "1", "--fail-when", str(go)],
                        ["--warm-restart", "--preload", "json"])
    until_recorded(out, lambda r: len([k for k in r if k[0] == 1]) == 2, "round 1", timeout=60)
    first = {r["pid"] for r in records(out).values()}
    spares = poll_until(lambda: (s := _spares_of(agent, first)) and len(s) == 2 and s, 60, "the next spares")
    killed = procs.processes([spares[0]])
    os.kill(spares[0], signal.SIGKILL)
    procs.gone_within(killed, 30, "killed spare")  # dead (a zombie of the agent's) before the restart takes it
    go.touch()
    assert agent.wait(60) == 0, agent.stderr()[-3000:]
    second = records(out)
    assert second[(2, 0)]["pid"] != spares[0] and second[(2, 1)]["pid"] == spares[1]
    err = agent.stderr()
    assert (f"the warm spare for local rank 0 (pid {spares[0]}) died before use (signal SIGKILL); the worker starts "
            "cold") in err, err[-3000:]
    assert "1 of them warm" in err


def test_a_preload_that_cannot_be_imported_is_a_clear_error_at_start(tmp_path):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "broken_mod.py").write_text("raise RuntimeError('this module is broken')\n")
    for preload, what in (("no_such_module_xyz", "ModuleNotFoundError: No module named 'no_such_module_xyz'"),
                          ("json,broken_mod", "RuntimeError: this module is broken")):
        res = subprocess.run([sys.executable, "-m", "etcd_agent", "--standalone", "--warm-restart",
                              "--preload", preload, str(JOB), str(tmp_path)],
                             capture_output=True, text=True, timeout=50, env={**os.environ, "PYTHONPATH": str(mods)})
        assert res.returncode == 2, res.stderr[-2000:]
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"etcd-agent: error: --preload {preload}: the workers' Python"), last
        assert what in last and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert "joined round" not in res.stderr  # nothing was joined or started


@pytest.mark.chaos
def test_no_spare_or_warm_worker_outlives_a_sigkilled_agent(tmp_path):
    """The parent-death signal holds for spares and for the workers they became."""
    out = tmp_path / "out"
    out.mkdir()
    agent = _standalone(tmp_path, "w", [str(JOB), str(out), "--run-until", str(tmp_path / "never")],
                        ["--warm-restart", "--preload", "json"])
    until_recorded(out, lambda r: len(r) == 2, "round 1", timeout=60)
    workers = {r["pid"] for r in records(out).values()}
    spares = set(poll_until(lambda: (s := _spares_of(agent, workers)) and len(s) == 2 and s, 60, "spares").values())
    agent.proc.kill()
    agent.proc.wait()
    poll_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                               for p in workers | spares), 15, "workers and spares gone")


@pytest.mark.torch
def test_a_crash_restart_job_with_warm_restart_on_two_agents(etcd_endpoint, run_id, tmp_path):
    """Two agents, --warm-restart with the default --preload (torch and torch._dynamo): rank 1 fails in round 1; every
    worker of round 2 is one of the spares that waited for it, and the job succeeds."""
    go = tmp_path / "go"
    agents, out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--fail-rank", "1", "--fail-when", str(go)],
                               nproc=2, extra=["--warm-restart", "--max-restarts", "1"])
    until_recorded(out, lambda r: len([k for k in r if k[0] == 1]) == 4, "round 1 on both agents", timeout=120)
    first = {r["pid"] for r in records(out).values()}
    spares = [poll_until(lambda a=a: (s := _spares_of(a, first)) and len(s) == 2 and s, 120, f"{a.node}'s spares")
              for a in agents]
    go.touch()
    assert wait_all(agents, 120) == [0, 0], [a.stderr()[-2000:] for a in agents]
    second = {r["pid"] for (rnd, _), r in records(out).items() if rnd == 2}
    assert second == {p for s in spares for p in s.values()}
    for a in agents:
        assert "2 of them warm" in a.stderr() and "warm spare(s) ready after" in a.stderr()
    # the warm worker's torch-style error file made the failure report, as a cold worker's does
    assert any("failed with exit code 3: RuntimeError: rank 1 fails in round 1" in a.stderr() for a in agents)


def test_hang_detection_holds_for_warm_workers(tmp_path):
    """Round 1 runs in the spares started with the agent; rank 1 never beats: --worker-timeout fails the job."""
    out = tmp_path / "out"
    out.mkdir()
    agent = _standalone(tmp_path, "w", [str(JOB), str(out), "--beat", "--hang-rank", "1", "--run-until",
                                        str(tmp_path / "never")],
                        ["--warm-restart", "--preload", "json", "--worker-timeout", "2", "--max-restarts", "0"])
    assert agent.wait(60) == 1
    err = agent.stderr()
    assert "2 of them warm" in err and "worker rank 1 (pid" in err and "made no progress for" in err, err[-3000:]
