"""The warm-restart benchmark's worker: a real torch DDP training loop (gloo), the same script under every launcher.

Its first line takes the start time. It then imports torch, joins the process group (torchrun's environment:
MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE), wraps a small model in DistributedDataParallel and trains. After its
first training step (forward, backward with DDP's allreduce, optimizer step) it writes ``OUT/<rank>-<pid>.json`` =
{rank, world_size, restart, attempt, full_gen, t_start, t_imported, t_group, t_ddp, t_step, pid}; ``attempt`` and
``full_gen`` as in
worker.py (counted from this rank's earlier records, because torchrun's restart count is per node).

- In the first full world, rank ``--crash-rank`` trains for ``--crash-after`` seconds after its first step, then
  adds ``t_exit`` to its record and exits 1, as a worker that crashes mid-training; the other ranks train on until
  their next collective fails or their launcher stops them. With ``--crash-at S`` instead it crashes S seconds
  after its own start, or right after its first step where that comes later (an early crash: a bad first batch,
  an out-of-memory at the first step), so that it crashes as long into the round under every launcher.
- After the first full world (the restarted job) every rank exits 0 after its first step.
"""

import time

T_START = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from worker import identity, write  # noqa: E402  (this directory is sys.path[0], as for any script)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--crash-rank", type=int, default=1)
    p.add_argument("--crash-after", type=float, default=5.0)
    p.add_argument("--crash-at", type=float, help="crash this long after the start, not before the first step")
    p.add_argument("--world", type=int, help="size of the full world (default: WORLD_SIZE)")
    a = p.parse_args()
    rec, full, fulls = identity(a.out, a.world, T_START)
    rank, world = rec["rank"], rec["world_size"]

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    t_imported = time.time()
    torch.manual_seed(rank)
    dist.init_process_group("gloo")
    t_group = time.time()
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                                        torch.nn.Linear(256, 16)))
    t_ddp = time.time()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        opt.zero_grad()
        loss = model(torch.randn(32, 256)).square().mean()
        loss.backward()
        opt.step()

    step()
    rec.update(t_imported=t_imported, t_group=t_group, t_ddp=t_ddp, t_step=time.time())
    write(a.out, rec)
    if fulls or world != full:
        os._exit(0)  # done; no process-group teardown, whose gloo destructor can abort a process at exit
    if a.crash_at is not None:
        crash_at = time.monotonic() + max(0.0, T_START + a.crash_at - time.time())
    else:
        crash_at = time.monotonic() + a.crash_after
    while True:
        if rank == a.crash_rank and time.monotonic() >= crash_at:
            write(a.out, {**rec, "t_exit": time.time()})
            os._exit(1)  # a crash: no clean shutdown of the process group
        step()
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
