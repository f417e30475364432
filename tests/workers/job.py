"""A configurable training stand-in for multi-node tests (no torch).

Every run records its environment to OUT/<round>-<rank>.json, then behaves as told:
  --fail-rank R --fail-round N   rank R exits 3 in round N (torch-style error file written first); the
                                 other ranks of that round block until stopped, like peers in a collective
  --always-fail-rank R           rank R exits 3 in every round (the others block likewise)
  --hold FILE [--hold-rank R]    rank R (default: every rank) waits until FILE exists, then exits 0
  --run-until FILE               every rank waits until FILE exists (a long job)
"""

import argparse
import json
import os
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--fail-rank", type=int)
p.add_argument("--fail-round", type=int, default=1)
p.add_argument("--always-fail-rank", type=int)
p.add_argument("--hold-rank", type=int)
p.add_argument("--hold")
p.add_argument("--run-until")
a = p.parse_args()

rank, rnd = int(os.environ["RANK"]), int(os.environ["ETCD_AGENT_ROUND"])
with open(os.path.join(a.out, f"{rnd}-{rank}.json.tmp"), "w") as f:
    json.dump({"env": dict(os.environ), "pid": os.getpid(), "time": time.time()}, f)
os.replace(os.path.join(a.out, f"{rnd}-{rank}.json.tmp"), os.path.join(a.out, f"{rnd}-{rank}.json"))


def fail(msg):
    with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
        json.dump({"message": {"message": msg, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    print(msg, file=sys.stderr)
    sys.exit(3)


def wait_for(path):
    # The test creates the file; a worker has no event to wait on but its own parent's signals.
    while not os.path.exists(path):
        time.sleep(0.02)


if a.always_fail_rank == rank:
    fail(f"RuntimeError: rank {rank} always fails")
if a.fail_rank == rank and a.fail_round == rnd:
    fail(f"RuntimeError: rank {rank} fails in round {rnd}")
if a.always_fail_rank is not None or (a.fail_rank is not None and a.fail_round == rnd):
    # Like a real job whose peer died: block (in a "collective") until the agent stops this worker.
    while True:
        time.sleep(3600)
if a.hold and a.hold_rank in (None, rank):
    wait_for(a.hold)
if a.run_until:
    wait_for(a.run_until)
