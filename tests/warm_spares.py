"""What the test_warm*.py modules share: a WorkerGroup with a SparePool and no etcd, the first round's
environments and assignment, and a standalone agent with --warm-restart whose waiting spares are found among its
children."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import psutil

from agents import WORKERS, CommandLine
from etcd_agent.config import WorkerConfig, worker_base_env
from etcd_agent.node.warm import SPARE_FILE, SparePool
from etcd_agent.node.api import Assignment
from etcd_agent.node.env import worker_env
from etcd_agent.node.workers import WorkerGroup


JOB = WORKERS / "job.py"


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
