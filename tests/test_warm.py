"""Warm restarts (--warm-restart): the flags, and a spare pool with its group without etcd: a group starts from its
spare, a spare still importing runs once its imports finish, a stale one is killed and the worker starts cold, a
preload that initialises CUDA is refused; a spare's log is private and never written through a symlink."""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat

import psutil
import pytest

from agents import records
from etcd_agent.config import WorkerConfig
from etcd_agent.errors import ConfigError
from etcd_agent.node.warm import ROUND_KEYS, known_env, parse_preload
from etcd_agent.node.api import Assignment
from etcd_agent.node.env import worker_env
from etcd_agent.node.workers import WorkerGroup
from warm_spares import JOB, _assignment, _first_envs, _group_with_pool


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
