"""A small DistributedDataParallel job on the CPU (gloo): the README's demo and the torch integration test.

Runs unchanged under torchrun or etcd-agent: it reads only torchrun's environment. Each rank trains a tiny linear
model on its shard of a synthetic regression problem, all-reduces a checksum to prove every rank took part, and
rank 0 prints the loss. ``--crash-once`` makes the last rank fail in the first round, to show a coordinated
restart (TORCHELASTIC_RESTART_COUNT rises on every node). ``--out DIR`` writes one JSON line per rank.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel


@record
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--crash-once", action="store_true")
    p.add_argument("--out")
    a = p.parse_args()

    dist.init_process_group("gloo")  # env:// with MASTER_ADDR/PORT, RANK, WORLD_SIZE from the launcher
    rank, world = dist.get_rank(), dist.get_world_size()
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if a.crash_once and restarts == 0 and rank == world - 1:
        raise RuntimeError(f"rank {rank}: simulated crash in the first attempt")

    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1000 + rank)
    true_w = torch.arange(8, dtype=torch.float32).unsqueeze(1) / 8
    for step in range(a.steps):
        x = torch.randn(64, 8, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), x @ true_w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 5 == 0 or step == a.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  (world size {world}, restart {restarts})", flush=True)

    check = torch.tensor([float(rank + 1)])
    dist.all_reduce(check)
    expected = world * (world + 1) / 2
    if check.item() != expected:
        sys.exit(f"all_reduce gave {check.item()}, expected {expected}")
    if a.out:
        with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "world": world, "sum": check.item(), "restarts": restarts,
                       "loss": loss.item(), "master": [os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]]}, f)
    if rank == 0:
        print(f"done: all_reduce over {world} ranks = {check.item():g}, final loss {loss.item():.4f}", flush=True)
    dist.barrier()  # nobody tears gloo down while a peer still talks to it
    dist.destroy_process_group()
    # torch 2.13's gloo sometimes aborts in the interpreter's teardown ("terminate called without an active
    # exception", SIGABRT) after all the work is done; the result is written and flushed: leave without that teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
