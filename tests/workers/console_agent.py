"""A stand-in agent whose console is the test's pipe: run one worker with the default output routing, wait for
it to end, exit with its exit code.

Usage: console_agent.py LOG_DIR SCRIPT [ARGS...]
"""

import sys
import threading

from etcd_agent.config import WorkerConfig
from etcd_agent.node.api import Assignment
from etcd_agent.node.workers import WorkerGroup

codes: list[int] = []
ended = threading.Event()


def on_exit(ex) -> None:
    codes.append(ex.returncode)
    ended.set()


cfg = WorkerConfig(entrypoint=sys.argv[2], args=tuple(sys.argv[3:]), nproc=1, log_dir=sys.argv[1])
group = WorkerGroup(cfg, on_exit=on_exit, node_id="stub")
group.start(Assignment(run_id="console", round=0, group_rank=0, group_world_size=1, rank_offset=0,
                       world_size=1, master_addr="127.0.0.1", master_port=29500, restart_count=0, max_restarts=0))
ended.wait(60)
group.stop("the worker ended")  # joins the pump: everything the worker wrote is on our stderr now
sys.exit(codes[0] if codes else 99)
