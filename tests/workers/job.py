"""A configurable training stand-in for multi-node tests (no torch).

Every run records its environment to OUT/<round>-<rank>.json, then behaves as told:
  --fail-rank R[,R...] --fail-round N   those ranks exit 3 in round N (torch-style error file written first),
                                        together, once every rank of the round has started; the other ranks
                                        block until stopped, like peers in a collective
  --exit-code N                         the failing ranks exit N instead of 3 (--no-restart-exit-code)
  --say FILE                            a failing rank prints FILE's content on stderr first (a secret, say)
  --fail-when FILE                      with --fail-rank: those ranks fail only once FILE exists
  --always-fail-rank R                  rank R exits 3 in every round (the others block likewise)
  --always-fail                         every rank this agent starts exits 3 in every round (a node with a bad GPU)
  --hold FILE [--hold-rank R]           rank R (default: every rank) waits until FILE exists, then exits 0
  --run-until FILE                      every rank waits until FILE exists (a long job)
  --ignore-sigterm                      SIGTERM is ignored (a worker stuck in C code): only SIGKILL ends it
  --beat                                call etcd_agent.progress.beat() while waiting (hang detection)
  --hang-rank R                         with --beat: rank R never beats (a hung worker)
"""

import argparse
import json
import os
import signal
import sys
import time

from etcd_agent.testing import records

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--fail-rank", type=lambda s: {int(x) for x in s.split(",")}, default=set())
p.add_argument("--fail-round", type=int, default=1)
p.add_argument("--fail-when")
p.add_argument("--say")
p.add_argument("--exit-code", type=int, default=3)
p.add_argument("--always-fail-rank", type=int)
p.add_argument("--always-fail", action="store_true")
p.add_argument("--hold-rank", type=int)
p.add_argument("--hold")
p.add_argument("--run-until")
p.add_argument("--ignore-sigterm", action="store_true")
p.add_argument("--beat", action="store_true")
p.add_argument("--hang-rank", type=int)
a = p.parse_args()

if a.ignore_sigterm:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
rank, rnd, world = int(os.environ["RANK"]), int(os.environ["ETCD_AGENT_ROUND"]), int(os.environ["WORLD_SIZE"])
records.write(os.path.join(a.out, f"{rnd}-{rank}.json"), {"env": dict(os.environ), "pid": os.getpid(),
                                                            "time": time.time()})
beating = a.beat and a.hang_rank != rank
FOREVER = 10 ** 9  # seconds: a blocked rank waits until its agent stops it


def beat() -> None:
    from etcd_agent.progress import beat

    beat()


def wait_for(path: str) -> None:
    """Until the test creates ``path`` (inotify on its directory), beating meanwhile if told to."""
    records.wait_path(path, tick=beat if beating else None, tick_s=0.1)


def fail(msg: str) -> None:
    if a.say:
        print(f"worker {rank} says: {open(a.say).read().strip()}", file=sys.stderr, flush=True)
        msg += f" ({open(a.say).read().strip()})"
    with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
        json.dump({"message": {"message": msg, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    print(msg, file=sys.stderr)
    sys.exit(a.exit_code)


failing_now = a.always_fail or a.always_fail_rank is not None or (a.fail_rank and a.fail_round == rnd)
if failing_now:
    def started() -> list[str]:
        names = [n for n in os.listdir(a.out) if n.startswith(f"{rnd}-") and n.endswith(".json")]
        return [os.path.join(a.out, n) for n in names] if len(names) >= world else []
    mine = records.wait_until(started, FOREVER, "every rank of the round started", a.out)
    # Every rank computes the same moment from the same records: the failing ranks exit within a millisecond.
    go = max(json.load(open(path))["time"] for path in mine) + 0.3
    time.sleep(max(0.0, go - time.time()))
if a.always_fail_rank == rank:
    fail(f"RuntimeError: rank {rank} always fails")
if a.always_fail:
    fail(f"RuntimeError: rank {rank} fails on this node in every round")
if rank in a.fail_rank and a.fail_round == rnd:
    if a.fail_when:
        wait_for(a.fail_when)
    fail(f"RuntimeError: rank {rank} fails in round {rnd}")
if failing_now:
    while True:  # like a real job whose peer died: blocked in a "collective" until the agent stops it
        if beating:
            beat()
            time.sleep(0.1)  # the beat's period: this worker's "work"
        else:
            signal.pause()
if a.hold and a.hold_rank in (None, rank):
    wait_for(a.hold)
if a.run_until:
    wait_for(a.run_until)
