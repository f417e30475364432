"""What a cluster bed (bed.py) made, kept on disk while it exists, and its removal.

The record (STATE_DIR/record.json: namespaces, links, processes started in the root namespace, the bed's
directory, whether /etc/hosts has its lines) is rewritten after every change, so that a bed whose test session was
killed can still be removed: by the next build, or by `python tests/cluster/record.py clean`. A lock (an abstract
UNIX socket's name: one socket at a time can bind it, and it goes with its process, leaving no file) keeps a
second bed on this machine waiting. ``remove`` tries every step whatever the others did and returns what failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

log = logging.getLogger("cluster-bed")

MARK = "# etcd-agent-cluster-bed"  # ends every /etc/hosts line a bed adds
STATE_DIR = Path("/run/etcd-agent-cluster-bed")  # the record, while a bed exists
LOCK_NAME = "\0etcd-agent-cluster-bed"  # an abstract socket name (root network namespace)
LOCK_WAIT_S = 120.0  # another session's bed on this machine: wait this long for it to go
POLL_S = 0.05  # `ip netns pids` has no event to wait on: it is polled


class BedError(RuntimeError):
    """The bed could not be built or removed; the message names the step and what the tool said."""


def run(*argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise BedError(f"{' '.join(argv)} exited with {done.returncode}: {(done.stderr or done.stdout).strip()}")
    return done


class Record:
    """What the bed made so far (namespaces, links, processes started in the root namespace, its directory,
    whether /etc/hosts has its lines), rewritten after every change; ``lock()`` holds the machine's bed lock."""

    def __init__(self) -> None:
        self.path = STATE_DIR / "record.json"
        self.items: dict = {"netns": [], "links": [], "pids": [], "root": None, "hosts": False}
        self._lock: socket.socket | None = None

    def lock(self, timeout: float = LOCK_WAIT_S) -> None:
        """Hold the machine's bed lock: an abstract UNIX socket's name, which only one socket can bind and which
        goes with its process, leaving no file behind."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(LOCK_NAME)
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise BedError(f"another cluster bed on this machine held its lock for more than {timeout:g} s")
                time.sleep(0.2)  # a lock has no event to wait on but its holder's exit
        self._lock = sock
        STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)

    locked = property(lambda self: self._lock is not None)
    made_anything = property(lambda self: any(self.items.values()))

    def unlock(self) -> None:
        if self._lock is not None:
            if not self.path.exists():
                with contextlib.suppress(OSError):
                    STATE_DIR.rmdir()
            self._lock.close()
            self._lock = None

    def load(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None

    def add(self, kind: str, value) -> None:
        if isinstance(self.items[kind], list):
            self.items[kind].append(value)
        else:
            self.items[kind] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.items))
        os.replace(tmp, self.path)

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)


def remove(items: dict, procs: list[subprocess.Popen] = ()) -> list[str]:
    """Remove what ``items`` (a Record's) names, every step tried whatever the others did; returns the failures."""
    failures: list[str] = []

    def step(what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - teardown goes on and reports every failure at the end
            failures.append(f"{what}: {exc}")

    for ns in items["netns"]:
        step(f"killing the processes of {ns}", kill_namespace, ns, procs)
    for pid, created in items["pids"]:
        step(f"killing pid {pid}", kill_pid, pid, created)
    for proc in procs:
        step(f"reaping pid {proc.pid}", proc.wait, 10)
    if items["hosts"]:
        step("removing the /etc/hosts lines", edit_hosts, [])
    for ns in items["netns"]:
        step(f"deleting namespace {ns}", delete_namespace, ns)
    for link in items["links"]:
        step(f"deleting link {link}", delete_link, link)
    if items["root"]:
        step(f"removing {items['root']}", shutil.rmtree, items["root"], True)
    return failures


def namespace_pids(ns: str) -> list[int]:
    done = run("ip", "netns", "pids", ns, check=False)
    if done.returncode != 0:
        if not os.path.exists(f"/run/netns/{ns}"):
            return []
        raise BedError(f"ip netns pids {ns}: {done.stderr.strip()}")
    return [int(p) for p in done.stdout.split()]


def kill_namespace(ns: str, procs: list[subprocess.Popen] = (), timeout: float = 10.0) -> None:
    """SIGKILL every process in network namespace ``ns`` until none is left (a node crash, or teardown)."""
    deadline = time.monotonic() + timeout
    while pids := namespace_pids(ns):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in procs:
            proc.poll()  # reaps our own children among them
        if time.monotonic() > deadline:
            raise BedError(f"processes {pids} of namespace {ns} survived SIGKILL for {timeout:g} s")
        time.sleep(POLL_S)


def kill_pid(pid: int, created: float) -> None:
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - created) < 0.01:  # the same process, not a later one with its pid
            proc.kill()
            proc.wait(10)
    except psutil.NoSuchProcess:
        pass


def delete_namespace(ns: str) -> None:
    if os.path.exists(f"/run/netns/{ns}"):
        run("ip", "netns", "delete", ns)


def delete_link(link: str) -> None:
    if os.path.exists(f"/sys/class/net/{link}"):
        run("ip", "link", "delete", link)


def edit_hosts(lines: list[str], path: str = "/etc/hosts") -> None:
    """Drop every line of ``path`` that ends with MARK, then append ``lines`` (each gets MARK)."""
    with open(path) as f:
        kept = [line for line in f.read().splitlines() if not line.rstrip().endswith(MARK)]
    text = "\n".join(kept + [f"{line} {MARK}" for line in lines]) + "\n"
    tmp = f"{path}.eabed-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    shutil.copymode(path, tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # /etc/hosts is a mount point (containers): rewrite it in place
        os.unlink(tmp)
        with open(path, "w") as f:
            f.write(text)


def clean_stale() -> None:
    """Remove the bed a killed session left (the caller holds the lock)."""
    record = Record()
    items = record.load()
    if items is None:
        return
    log.warning("removing the cluster bed a previous session left behind: %s", items)
    failures = remove(items)
    if failures:
        raise BedError("could not remove the previous session's cluster bed: " + "; ".join(failures))
    record.forget()


if __name__ == "__main__":
    # python tests/cluster/record.py clean: remove a bed a killed test session left behind
    if sys.argv[1:] != ["clean"]:
        sys.exit("usage: record.py clean")
    logging.basicConfig(level=logging.INFO)
    rec = Record()
    rec.lock()
    try:
        clean_stale()
    finally:
        rec.unlock()
