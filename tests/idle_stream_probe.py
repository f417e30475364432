"""An idle watch stream's threads and wake-ups, measured in a process of its own (``test_steady``).

    python tests/idle_stream_probe.py ENDPOINT     prints one JSON object: added, serving, woke

The stream loop and gRPC's poller serve every stream of a process, so in a test process that other tests used
(pytest-xdist reuses its workers) a client left open elsewhere wakes them too; here they serve this stream only.
"""

from __future__ import annotations

import json
import queue
import sys
import threading

from etcd_agent.config import EtcdConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.etcd.client import Etcd
from etcd_agent.etcd.waits import quiet_grpc_waits
from etcd_agent.etcd.watch import WatchStream

WAIT = 60.0


def wakeups(native_id: int) -> int:
    """Context switches so far of one thread of this process (each time it woke up), from /proc."""
    try:
        with open(f"/proc/self/task/{native_id}/status") as f:
            return sum(int(line.split()[1]) for line in f
                       if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))
    except OSError:
        return 0  # it ended


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
        first = {tid: wakeups(tid) for tid in serving}
        threading.Event().wait(2.0)  # a pause, not a synchronization: the window whose wake-ups are counted
        woke = {name: wakeups(tid) - first[tid] for tid, name in serving.items()}
    finally:
        stream.cancel()
        e.close()
    return {"delivered": delivered, "added": added, "serving": sorted(serving.values()), "woke": woke}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
