"""A gloo worker for the torchrun-backend tests: all_reduce, and record what this worker saw.

``--until-world W``: while the world is smaller than W, keep all-reducing (0.1 s apart) until torchrun's agent
stops this worker for a new round (a node joined); ``--while-world W``: the same while the world is W (until a
node leaves). ``--crash-once RANK``: that global rank exits 3 the
first time any worker of the job gets there (a marker file in ``--out``). ``--always-fail RANK``: that rank
exits 3 every time. Each worker writes ``<out>/<pid>.json``: rank, world, group rank, restart count, master,
the all_reduce sum.
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from etcd_agent.testing import records


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--until-world", type=int, default=0)
    p.add_argument("--while-world", type=int, default=0)
    p.add_argument("--crash-once", type=int, default=-1)
    p.add_argument("--always-fail", type=int, default=-1)
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    marker = os.path.join(a.out, "crashed")
    if rank == a.always_fail or (rank == a.crash_once and not os.path.exists(marker)):
        open(marker, "w").close()
        print(f"rank {rank}: failing on purpose", file=sys.stderr, flush=True)
        sys.exit(3)
    while (a.until_world and world < a.until_world) or world == a.while_world:
        dist.all_reduce(torch.ones(1))
        time.sleep(0.1)  # the pace of this stand-in's training until the agent restarts it: work, not a wait
    total = torch.tensor([float(rank + 1)])
    for _ in range(a.steps):
        dist.all_reduce(total)
        total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    record = {"rank": rank, "world": world, "sum": total.item(), "group_rank": int(os.environ["GROUP_RANK"]),
              "restart_count": int(os.environ["TORCHELASTIC_RESTART_COUNT"]),
              "master": [os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]],
              "use_agent_store": os.environ.get("TORCHELASTIC_USE_AGENT_STORE"), "time": time.time()}
    records.write(os.path.join(a.out, f"{os.getpid()}.json"), record)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
