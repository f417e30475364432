"""An idle watch stream's threads and wake-ups, measured in a process of its own (``test_steady``).

    python tests/idle_stream_probe.py ENDPOINT     prints one JSON object: added, serving, woke

The stream loop and gRPC's poller serve every stream of a process, so in a test process that other tests used
(pytest-xdist reuses its workers) a client left open elsewhere wakes them too; here they serve this stream only.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from pathlib import Path

from etcd_agent.config import EtcdConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.etcd.client import Etcd
from etcd_agent.etcd.waits import quiet_grpc_waits
from etcd_agent.etcd.watch import WatchStream

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
from steady import task_switches  # noqa: E402 - the benchmark's /proc reader

WAIT = 60.0


def main(endpoint: str) -> dict:
    quiet_grpc_waits()
    e = Etcd(EtcdConfig(parse_endpoints(endpoint)))
    e.stream_channel_and_auth()  # the process's loop thread and gRPC's poller exist: they are not the stream's
    before = {t.native_id for t in threading.enumerate()}
    deliveries: queue.SimpleQueue = queue.SimpleQueue()
    stream = WatchStream(e, lambda *delivery: deliveries.put(delivery), probe_interval=60.0, name="idle-watch")
    stream.add("idle", "/idle/", b"/idle0", 1)
    stream.start()
    try:
        e.put("/idle/a", b"1")
        delivered = [ev.key for ev in deliveries.get(timeout=WAIT)[2]]
        added = [t.name for t in threading.enumerate() if t.native_id not in before and t.name != "watch-prober"]
        serving = {t.native_id: t.name for t in threading.enumerate()
                   if t.name in ("idle-watch", "etcd-streams") or "_poll_wrapper" in t.name}
        first = task_switches([os.getpid()])
        threading.Event().wait(2.0)  # a pause, not a synchronization: the window whose wake-ups are counted
        after = task_switches([os.getpid()])
        woke = {name: after.get(tid, first[tid]) - first[tid] for tid, name in serving.items()}
    finally:
        stream.cancel()
        e.close()
    return {"delivered": delivered, "added": added, "serving": sorted(serving.values()), "woke": woke}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
