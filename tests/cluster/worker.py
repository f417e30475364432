"""A worker for the cluster tests (no torch): records where it ran, then exits 0 (or trains until a file appears).

    worker.py OUT [--until FILE]

Writes OUT/<round>-<rank>.json with its host name (socket.gethostname(), the node's UTS name), its pid, its
arguments and working directory, the torchrun variables and the run id (any other argument is only recorded);
with --until it then waits until FILE exists (a long job).
"""

import json
import os
import socket
import sys
import time

out = sys.argv[1]
until = sys.argv[sys.argv.index("--until") + 1] if "--until" in sys.argv else None
names = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
         "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "ETCD_AGENT_ROUND", "SLURM_JOB_ID", "SLURM_PROCID",
         "SLURMD_NODENAME", "SLURM_RESTART_COUNT")
record = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "argv": sys.argv[1:],
          "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in names}}
rnd, rank = os.environ["ETCD_AGENT_ROUND"], os.environ["RANK"]
tmp = os.path.join(out, f".{rnd}-{rank}.json.tmp")
with open(tmp, "w") as f:
    json.dump(record, f)
os.replace(tmp, os.path.join(out, f"{rnd}-{rank}.json"))
print(f"rank {rank} of round {rnd} ran on {record['host']}", flush=True)
while until and not os.path.exists(until):
    time.sleep(0.05)  # "training": the test creates the file when the job may end
