"""Warm restarts (--warm-restart): pre-started interpreters handed the next round, indistinguishable from cold
workers; spares that died or are stale are replaced cold; a --preload that cannot be imported is an error at start."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from agents import WORKERS, AgentProc, CommandLine, poll_until, until_recorded, records, start_agents, wait_all
from etcd_agent.node import priority, warm
from etcd_agent.config import WorkerConfig, worker_base_env
from etcd_agent.errors import ConfigError
from etcd_agent.node.warm import REFILL_DELAY, ROUND_KEYS, SPARE_FILE, SparePool, known_env, parse_preload
from etcd_agent.node.api import Assignment
from etcd_agent.testing import procs
from etcd_agent.node.env import worker_env
from etcd_agent.node.workers import WorkerGroup

IDENTITY = WORKERS / "identity.py"
JOB = WORKERS / "job.py"


# --- flags ---------------------------------------------------------------------------------------------------
def test_preload_names_are_checked():
    assert parse_preload("torch, numpy.linalg,torch") == ("torch", "numpy.linalg")
    assert parse_preload("") == ()
    with pytest.raises(ConfigError, match=r"--preload 'torch,1x': '1x' is not a module name"):
        parse_preload("torch,1x")


def _resolve(*argv: str):
    from etcd_agent.cli.main import build_parser
    from etcd_agent.cli.launch import resolve

    parser = build_parser()
    return resolve(parser, parser.parse_args(list(argv)))


def test_warm_restart_flags_resolve_and_bad_combinations_are_named():
    cfg = _resolve("--standalone", "--warm-restart", str(JOB)).cfg.workers
    assert cfg.warm_restart and cfg.preload == ("torch", "torch._dynamo")
    assert _resolve("--standalone", "--warm-restart", "--preload", "json", str(JOB)).cfg.workers.preload == ("json",)
    assert not _resolve("--standalone", str(JOB)).cfg.workers.warm_restart
    with pytest.raises(ConfigError, match="--preload 'json' only matters with --warm-restart"):
        _resolve("--standalone", "--preload", "json", str(JOB))
    with pytest.raises(ConfigError, match="--warm-restart pre-starts Python interpreters; --no-python"):
        _resolve("--standalone", "--warm-restart", "--no-python", "true")


def test_the_known_environment_leaves_out_what_depends_on_the_round():
    cfg = WorkerConfig(str(JOB), (), 2)
    a = Assignment("r", 3, 1, 2, 2, 4, "10.0.0.1", 1234, 2, 5)
    env = worker_env(cfg, a, 1, {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"}, "/logs/error.json")
    known = known_env({**env, "ETCD_AGENT_PROGRESS_FILE": "/logs/progress"})
    assert not set(known) & ROUND_KEYS
    assert {k: known[k] for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_MAX_RESTARTS",
                                  "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PATH")} == {
        "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "r", "TORCHELASTIC_MAX_RESTARTS": "5",
        "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0,1", "PATH": "/bin"}
    b = Assignment("r", 9, 0, 3, 0, 6, "10.0.0.2", 999, 7, 5)  # another round, another rank: the same known part
    assert known_env(worker_env(cfg, b, 1, {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"}, "/x")) == known


# --- the pool and the group, without etcd --------------------------------------------------------------------
def _group_with_pool(tmp_path: Path, script: str, args=(), preload=("json",), nproc: int = 1):
    cfg = WorkerConfig(script, tuple(args), nproc, log_dir=str(tmp_path / "logs"), warm_restart=True,
                       preload=tuple(preload), stop_timeout=3)
    pool = SparePool(cfg, cfg.log_dir, "run", "node")
    exits = []
    done = threading.Event()

    def on_exit(ex):
        exits.append(ex)
        if len(exits) == nproc:
            done.set()
    return cfg, pool, WorkerGroup(cfg, on_exit=on_exit, node_id="node", spares=pool), exits, done


def _first_envs(cfg: WorkerConfig) -> dict[int, dict[str, str]]:
    a = Assignment("run", 0, 0, 1, 0, cfg.nproc, "", 0, 0, 0)
    return {i: worker_env(cfg, a, i, worker_base_env(), "") for i in range(cfg.nproc)}


def _assignment(cfg: WorkerConfig, rnd: int = 1) -> Assignment:
    return Assignment("run", rnd, 0, 1, 0, cfg.nproc, "127.0.0.1", 29500, 0, 0)


def test_a_group_starts_from_its_spare_and_the_worker_runs_the_script(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg, pool, group, exits, done = _group_with_pool(tmp_path, str(JOB), [str(out)])
    pool.fill(_first_envs(cfg))
    pool.wait_ready(60)
    spare_pid = pool.pids[0]
    try:
        group.start(_assignment(cfg))
        assert group.pids == [spare_pid] and pool.handed == 1
        assert done.wait(30), "the warm worker did not exit"
        assert exits[0].returncode == 0 and exits[0].pid == spare_pid
        assert records(out)[(1, 0)]["pid"] == spare_pid
    finally:
        group.stop("test over")
        pool.close()


def test_a_spare_still_importing_is_handed_the_round_and_runs_once_its_imports_finish(tmp_path, monkeypatch):
    slow = tmp_path / "mods"
    slow.mkdir()
    imported = tmp_path / "imported"  # the import ends once this exists: after the spare was handed the round
    (slow / "slow_import.py").write_text(f"from etcd_agent.testing import records\n"
                                         f"assert records.wait_path({str(imported)!r}, 60)\n")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(slow))
    cfg, pool, group, exits, done = _group_with_pool(tmp_path, str(JOB), [str(out)], preload=("slow_import",))
    pool.fill(_first_envs(cfg))
    spare_pid = pool.pids[0]
    try:
        group.start(_assignment(cfg))  # the spare is still in its import: it waits for ``imported``
        assert group.pids == [spare_pid]
        imported.touch()
        assert done.wait(30) and exits[0].returncode == 0
        assert records(out)[(1, 0)]["pid"] == spare_pid
    finally:
        group.stop("test over")
        pool.close()


def test_a_stale_spare_is_killed_and_the_worker_starts_cold(tmp_path, caplog, monkeypatch):
    mods = tmp_path / "mods"
    mods.mkdir()
    mod = mods / "my_preload.py"
    mod.write_text("VALUE = 1\n")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(mods))
    try:
        cfg, pool, group, exits, done = _group_with_pool(tmp_path, str(JOB), [str(out)], preload=("my_preload",))
        pool.fill(_first_envs(cfg))
        pool.wait_ready(60)
        first = pool.pids[0]
        stat = mod.stat()
        os.utime(mod, (stat.st_atime, stat.st_mtime + 10))  # the module was upgraded after the spare imported it
        caplog.set_level("INFO", logger="etcd_agent.node.warm")
        group.start(_assignment(cfg))
        assert group.pids != [first] and pool.handed == 0
        assert "the files of my_preload changed since it imported them; the worker starts cold" in caplog.text
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
        assert done.wait(30) and exits[0].returncode == 0
        group.stop("round over")
        # the environment the next worker needs differs from the spare's: stale as well
        pool.fill()
        pool.wait_ready(60)
        second = pool.pids[0]
        monkeypatch.setenv("SOMETHING_NEW", "1")
        group2 = WorkerGroup(cfg, on_exit=lambda ex: None, node_id="node", spares=pool)
        group2.start(_assignment(cfg, 2))
        assert group2.pids != [second]
        assert "is stale: the worker's environment changed since it started (SOMETHING_NEW)" in caplog.text
        group2.stop("test over")
    finally:
        group.stop("test over")
        pool.close()


def test_a_preload_that_initialises_cuda_is_refused(tmp_path, monkeypatch):
    """A spare must never touch a GPU before it is handed a round: a preload that initialised CUDA (a stand-in
    torch whose cuda.is_initialized() is true) is a clear error at start."""
    fake = tmp_path / "mods" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("class cuda:\n    @staticmethod\n"
                                      "    def is_initialized():\n        return True\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    cfg, pool, *_ = _group_with_pool(tmp_path, str(JOB), preload=("torch",))
    pool.fill(_first_envs(cfg))
    with pytest.raises(ConfigError, match="initialised CUDA; a spare must not touch a GPU"):
        pool.wait_ready(60)


# --- real agents ---------------------------------------------------------------------------------------------
def _spares_of(agent: CommandLine, exclude=()) -> dict[int, int]:
    """local rank -> pid of the agent's waiting spares (children running spare.py, not yet workers)."""
    found = {}
    try:
        children = psutil.Process(agent.proc.pid).children()
    except psutil.Error:
        return {}
    for p in children:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if SPARE_FILE in cmd and p.pid not in exclude:
            found[json.loads(cmd[cmd.index(SPARE_FILE) + 2])["local_rank"]] = p.pid
    return found


def _standalone(tmp_path: Path, name: str, entry: list[str], extra=(), nproc: int = 2, cwd=None) -> CommandLine:
    work = tmp_path / name
    work.mkdir(exist_ok=True)
    restarts = [] if "--max-restarts" in extra else ["--max-restarts", "1"]
    return CommandLine(["--standalone", "--run-id", "warm-test", "--node-id", "n0", "--nproc-per-node", str(nproc),
                        *restarts, "--log-dir", str(tmp_path / "logs"), "--stop-timeout", "3", *extra,
                        *entry], work, "n0", cwd=cwd)


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


# --- the spares' logs: private, never through a symlink ------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="plants another user's symlink with chown (root only)")
def test_a_spares_log_is_private_and_never_written_through_a_planted_symlink(tmp_path, caplog):
    """A spare's log is 0600 in 0700 directories. Another user's symlink at a spare's log path is refused at start
    (ConfigError naming it) and the file it points to is untouched; a spare directory that became writable by others
    mid-job turns warm restarts off with one warning instead of ending the job."""
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    cfg, pool, _group, _exits, _done = _group_with_pool(tmp_path, str(JOB), [str(tmp_path)], nproc=2)
    spares = tmp_path / "logs" / "run" / "spares" / "node"
    for d in (*reversed(spares.parents[:3]), spares):  # the agent's own tree, as an earlier agent made it
        d.mkdir(mode=0o700, exist_ok=True)
    (spares / "local_rank_1.log").symlink_to(secret)
    os.lchown(spares / "local_rank_1.log", 65534, 65534)
    try:
        with pytest.raises(ConfigError, match=re.escape(f"--log-dir: {spares}/local_rank_1.log is a symbolic link;")):
            pool.fill(_first_envs(cfg))
        assert secret.read_text() == "root only\n"
        (spares / "local_rank_1.log").unlink()
        pool.fill(_first_envs(cfg))
        pool.wait_ready(60)
        shutil.rmtree(tmp_path / "logs" / "run")  # the next spares make the tree themselves
        pool.close()
        pool.fill(_first_envs(cfg))
        pool.wait_ready(60)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "logs" / "run").rglob("*")}
        assert modes == {"spares": 0o700, "node": 0o700, "local_rank_0.log": 0o600, "local_rank_1.log": 0o600}
        pool.take(0, _first_envs(cfg)[0]).kill()  # round 1 took it; the next fill is a mid-job one
        spares.chmod(0o777)
        with caplog.at_level(logging.WARNING, logger="etcd_agent.node.warm"):
            pool.fill()
        assert pool.disabled and pool.pids.keys() == {1}
        assert [r.getMessage() for r in caplog.records if "off for the rest" in r.getMessage()] == [
            f"warm restarts are off for the rest of the job: --log-dir: {spares} may be written by other users (mode "
            "0777); the agent writes worker logs only into directories it made itself (remove it, or choose another "
            "--log-dir)"]
    finally:
        pool.close()
