"""One process of the scale benchmark: K simulated nodes (``sim.SimJob``) driven over stdin/stdout JSON lines.

    python tools/bench/sim_proc.py        (started by scale.py, never by hand)

Commands, one JSON object per stdin line:
  {"cmd": "init", "params": {JobParams fields}, "nodes": [...], "log_level": "WARNING", "nice": 19}
                                        -> {"ev": "ready"}
  {"cmd": "start"}                      -> {"ev": "launched", "t_first": T, "t_last": T} (all K threads started)
  {"cmd": "leave", "node": N}           -> {"ev": "left", "node": N, "t": T}   (agent.py's graceful SIGTERM leave)
  {"cmd": "end_workers", "code": 0}     -> {"ev": "ended", "count": C, "t": T} (every running stand-in exits)
  {"cmd": "threads"}                    -> {"ev": "threads", "count": C, "kinds": {name: [native thread ids]}} (the
                                        Python threads by name, numbers and hex ids made "#" so alike ones add up)
  {"cmd": "quit"}                       exits at once (os._exit), like a node losing power
Events it sends on its own: {"ev": "start", node, round, group_rank, world_size, lease, t} when a node's stand-in
workers start, {"ev": "done", node, code, error, t} when an agent's ``run()`` returns or raises. Times are
``time.monotonic()``. The end of stdin (the benchmark went away) ends the process at once too; scale.py also
arms the parent-death signal, so this process never outlives it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import threading
import time

from etcd_agent.testing.sim import Done, Hub, JobParams, SimJob, Start

_out_lock = threading.Lock()


def emit(**msg) -> None:
    line = json.dumps(msg, separators=(",", ":")) + "\n"
    with _out_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def main() -> int:
    job: SimJob | None = None
    nodes: list[str] = []

    def on_start(s: Start) -> None:
        emit(ev="start", node=s.node, round=s.round, group_rank=s.group_rank, world_size=s.world_size,
             lease=job.lease_of(s.node) if job else 0, t=s.t)

    def on_done(d: Done) -> None:
        emit(ev="done", **dataclasses.asdict(d))

    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "init":
            logging.basicConfig(level=msg.get("log_level", "WARNING"), stream=sys.stderr,
                                format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
            if msg.get("nice"):
                os.nice(msg["nice"])  # below etcd and the benchmark itself (scale.py's module doc, "CPU")
            job, nodes = SimJob(JobParams(**msg["params"]), Hub(on_start, on_done)), list(msg["nodes"])
            emit(ev="ready", pid=os.getpid())
        elif cmd == "start":
            first, last = job.start(nodes)
            emit(ev="launched", t_first=first, t_last=last)
        elif cmd == "leave":
            emit(ev="left", node=msg["node"], t=job.leave(msg["node"]))
        elif cmd == "end_workers":
            t = time.monotonic()
            emit(ev="ended", count=job.end_workers(msg.get("nodes"), msg.get("code", 0)), t=t)
        elif cmd == "threads":
            kinds: dict[str, list[int]] = {}
            for t in threading.enumerate():
                kinds.setdefault(re.sub(r"[0-9a-f]{8,}|\d+", "#", t.name), []).append(t.native_id)
            emit(ev="threads", count=sum(map(len, kinds.values())), kinds=kinds)
        elif cmd == "quit":
            break
    sys.stdout.flush()
    os._exit(0)  # no graceful leave, no thread joins: the benchmark's teardown must not wait on N agents


if __name__ == "__main__":
    sys.exit(main())
