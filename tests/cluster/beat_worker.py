"""A worker for the cluster fault tests (no torch): it records where and when it ran, heartbeats, and with --ring
passes a token around a TCP ring of all the job's workers, so that a cut between nodes hangs it as a collective
hangs.

    beat_worker.py OUT --until FILE [--ring]

OUT/<round>-<rank>.json (the same name and fields as worker.py's record, so slurm.records reads it) is rewritten
every BEAT_S seconds: ``start`` (wall time the worker began), ``beat`` (the newest heartbeat: the worker was alive
then), ``steps`` (ring steps done), and at the end ``end`` and ``how`` (``until``: FILE appeared; ``SIGTERM``; or
what failed). A worker killed by SIGKILL records no end: its newest ``beat`` is the last time it was seen alive.

It exits 0 once FILE exists. With --ring, rank 0 serves a table of the workers' ring addresses on MASTER_PORT;
every worker sends each token it gets from rank-1 on to rank+1, rank 0 starts one every BEAT_S seconds, and each
completed step touches $ETCD_AGENT_PROGRESS_FILE (the agent's --worker-timeout heartbeat). Reads have no deadline
of their own: a peer behind a dropped link stalls the ring until the agent restarts the job. A ring peer that
closes its connection before FILE exists fails the worker (exit 1), as a collective does.
"""

import json
import os
import signal
import socket
import sys
import threading
import time

BEAT_S = 0.1
out, until = sys.argv[1], sys.argv[sys.argv.index("--until") + 1]
names = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
         "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "ETCD_AGENT_ROUND", "SLURM_JOB_ID", "SLURM_PROCID",
         "SLURMD_NODENAME")
now = time.time()
record = {"host": socket.gethostname(), "pid": os.getpid(), "time": now, "start": now, "beat": now, "steps": 0,
          "env": {k: os.environ.get(k) for k in names}}
rnd, rank, world = os.environ["ETCD_AGENT_ROUND"], int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
lock = threading.RLock()  # the SIGTERM handler may interrupt a save on the main thread


def save(**fields) -> None:
    with lock:
        record.update(fields)
        tmp = os.path.join(out, f".{rnd}-{rank}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, os.path.join(out, f"{rnd}-{rank}.json"))


def finish(how: str, code: int) -> None:
    save(beat=time.time(), end=time.time(), how=how)
    os._exit(code)  # the heartbeat thread must not write after the end


def heartbeat() -> None:
    while True:
        time.sleep(BEAT_S)
        if "end" not in record:
            save(beat=time.time())


def stopped() -> bool:
    return os.path.exists(until)


def recv_line(conn: socket.socket) -> str:
    """One line from ``conn``; reads have no deadline, but the stop file is looked at every BEAT_S seconds."""
    data = b""
    conn.settimeout(BEAT_S)
    while not data.endswith(b"\n"):
        try:
            chunk = conn.recv(4096)
        except socket.timeout:
            if stopped():
                finish("until", 0)
            continue
        if not chunk:
            finish("until", 0) if stopped() else finish("a ring peer closed its connection", 1)
        data += chunk
    return data.decode().strip()


def connect(host: str, port: int) -> socket.socket:
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=1.0)
            conn.settimeout(None)
            return conn
        except OSError:
            if stopped():
                finish("until", 0)
            time.sleep(BEAT_S)  # not listening yet, or not reachable: try again


def table() -> list[tuple[str, int]]:
    """Every rank's ring address, from rank 0's table server on MASTER_PORT."""
    listener = socket.create_server(("0.0.0.0", 0))
    me = (socket.gethostname(), listener.getsockname()[1])
    if rank == 0:
        server = socket.create_server(("0.0.0.0", int(os.environ["MASTER_PORT"])), reuse_port=False)
        entries, conns = {0: me}, []
        while len(entries) < world:
            conn, _ = server.accept()
            r, host, port = recv_line(conn).split()
            entries[int(r)], conns = (host, int(port)), conns + [conn]
        text = json.dumps([entries[r] for r in range(world)]).encode() + b"\n"
        for conn in conns:
            conn.sendall(text)
        addrs = [tuple(e) for e in json.loads(text)]
    else:
        conn = connect(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        conn.sendall(f"{rank} {me[0]} {me[1]}\n".encode())
        addrs = [tuple(e) for e in json.loads(recv_line(conn))]
    return listener, addrs


def ring() -> None:
    listener, addrs = table()
    nxt = connect(*addrs[(rank + 1) % world])
    prev, _ = listener.accept()
    progress = os.environ.get("ETCD_AGENT_PROGRESS_FILE")
    step = 0
    while True:
        if rank == 0:
            time.sleep(BEAT_S)
            nxt.sendall(f"{step}\n".encode())
            step = int(recv_line(prev)) + 1
        else:
            step = int(recv_line(prev))
            nxt.sendall(f"{step}\n".encode())
            step += 1
        record["steps"] = step
        if progress:
            with open(progress, "a"):
                os.utime(progress)


signal.signal(signal.SIGTERM, lambda *_: finish("SIGTERM", 143))
save()
print(f"rank {rank} of round {rnd} ran on {record['host']}", flush=True)
threading.Thread(target=heartbeat, daemon=True).start()
if "--ring" in sys.argv:
    ring()
while not stopped():
    time.sleep(BEAT_S)  # "training": the test creates the file when the job may end
finish("until", 0)
