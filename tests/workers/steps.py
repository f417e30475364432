"""A training stand-in that reports steps through ``etcd_agent.progress.beat(step)`` (no torch).

  --steps N --every S     beat steps 1..N, S seconds apart, then exit 3 (a crash); every round starts again at
                          step 1, as a job without a checkpoint does
  --rate R                beat steps 1, 2, ... at R steps per second until the agent stops it (a long job)
"""

import argparse
import sys
import time

from etcd_agent.progress import beat

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=0)
p.add_argument("--every", type=float, default=0.6)
p.add_argument("--rate", type=float, default=0.0)
a = p.parse_args()

if a.rate:
    step, start = 0, time.monotonic()
    while True:
        step += 1
        beat(step)
        time.sleep(max(0.0, start + step / a.rate - time.monotonic()))  # the step rate: the stand-in's work
for step in range(1, a.steps + 1):
    beat(step)
    time.sleep(a.every)  # a step's length: the stand-in's work
print(f"crashing after step {a.steps}", file=sys.stderr, flush=True)
sys.exit(3)
