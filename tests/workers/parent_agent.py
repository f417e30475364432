"""A stand-in agent: start one hang.py worker through WorkerGroup, then wait to be killed.

Usage: parent_agent.py LOG_DIR
"""

import os
import sys
import threading

from etcd_agent.config import WorkerConfig
from etcd_agent.node.api import Assignment
from etcd_agent.node.workers import WorkerGroup

here = os.path.dirname(os.path.abspath(__file__))
cfg = WorkerConfig(entrypoint=os.path.join(here, "hang.py"), args=(), nproc=1, log_dir=sys.argv[1])
group = WorkerGroup(cfg, on_exit=lambda ex: None, node_id="stub")
group.start(Assignment(run_id="pdeathsig", round=0, group_rank=0, group_world_size=1, rank_offset=0,
                       world_size=1, master_addr="127.0.0.1", master_port=29500, restart_count=0, max_restarts=0))
threading.Event().wait()
