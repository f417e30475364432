"""The benchmark's worker: the same script under etcd-agent and under torchrun. No torch import.

Reads only torchrun's variables RANK, WORLD_SIZE and TORCHELASTIC_RESTART_COUNT. Its first line takes the start
time; it then writes ``OUT/<rank>-<pid>.json`` = {rank, world_size, restart, attempt, full_gen, t_start, pid}:
- ``attempt``: TORCHELASTIC_RESTART_COUNT, or the number of earlier records of this rank if that is larger.
  torchrun counts restarts per agent, so after a peer node's failure its workers start again with
  TORCHELASTIC_RESTART_COUNT=0; etcd-agent's count is job-wide, and there the two agree.
- ``full_gen``: in a world of ``--world`` workers (default: WORLD_SIZE), how many earlier full-world records this
  rank has (0 in the first full world); null in a smaller world.

Then it behaves as ``--mode`` says:
  exit       exit 0 at once.
  crash      in the first full world, rank ``--crash-rank`` waits until every rank of it has recorded, adds
             ``t_exit`` to its record and exits 1; the other ranks block until killed, like peers stuck in a collective.
  peer-loss  in the first full world, every rank waits until all ranks have recorded, then watches its peers' pids
             and exits 1 (with ``t_exit``) as soon as one is gone, like a collective failing on a closed connection.
  hold       wait until the file ``--hold`` exists, then exit 0.
After the first full world (a restart), every mode but hold exits 0 at once. In a smaller world before the first
full one (an elastic job that started with fewer nodes and will grow) crash and peer-loss block until killed.
"""

import time

T_START = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from etcd_agent.testing import records  # noqa: E402  (the tests' record files: written whole, read in name order)

POLL_S = 0.01  # a worker has no event to wait on for its peers' files; it polls the directory


def write(out: str, rec: dict) -> None:
    records.write(os.path.join(out, f"{rec['rank']}-{rec['pid']}.json"), rec)


load = records.load


def first_full_world(out: str, world: int) -> dict[int, int]:
    """rank -> pid of the first full world, once all its ranks have recorded."""
    while True:
        found = {r["rank"]: r["pid"] for r in load(out) if r["world_size"] == world and r["full_gen"] == 0}
        if len(found) >= world:
            return found
        time.sleep(POLL_S)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def block() -> None:
    while True:
        time.sleep(3600)


def identity(out: str, world_arg: int | None, t_start: float) -> tuple[dict, int, int]:
    """``(record, full world size, earlier full-world records of this rank)``; the record has rank, world_size,
    restart, attempt, full_gen, t_start and pid (see the module doc)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    full = world_arg or world
    mine = [r for r in load(out) if r["rank"] == rank]
    fulls = sum(r["world_size"] == full for r in mine)
    return ({"rank": rank, "world_size": world, "restart": restart, "attempt": max(restart, len(mine)),
             "full_gen": fulls if world == full else None, "t_start": t_start, "pid": os.getpid()}, full, fulls)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=["exit", "crash", "peer-loss", "hold"], default="exit")
    p.add_argument("--crash-rank", type=int, default=0)
    p.add_argument("--world", type=int, help="size of the full world (default: WORLD_SIZE)")
    p.add_argument("--hold")
    a = p.parse_args()
    rec, full, fulls = identity(a.out, a.world, T_START)
    rank, world = rec["rank"], rec["world_size"]
    write(a.out, rec)
    if a.mode == "hold":
        while not os.path.exists(a.hold):
            time.sleep(POLL_S)
        return 0
    if a.mode == "exit" or fulls:
        return 0
    if world != full:
        block()
    everyone = first_full_world(a.out, full)
    if a.mode == "crash":
        if rank != a.crash_rank:
            block()
        write(a.out, {**rec, "t_exit": time.time()})
        return 1
    others = [pid for r, pid in everyone.items() if r != rank]
    while all(alive(pid) for pid in others):
        time.sleep(POLL_S)
    write(a.out, {**rec, "t_exit": time.time()})
    return 1


if __name__ == "__main__":
    sys.exit(main())
