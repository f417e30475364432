"""The processes of the scale benchmark (scale.py): the agent processes (sim_proc.py) and what they report, etcd's
scheduling priority and counters read from /proc.

``Child`` is one process of K simulated agents, in its own process group (SIGKILLed as one) but in the benchmark's
session, with the parent-death signal armed; a thread reads its JSON lines into the ``Board``, where waits are
bounded by a deadline. ``Fleet`` is all of them for one N, the victim of the lost-lease scenario alone in the last.
Imports the standard library, psutil and ``etcd_agent.proctree``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

from etcd_agent.proctree import pdeathsig_preexec

HERE = Path(__file__).resolve().parent


class Board:
    """Everything the processes reported, under one condition."""

    def __init__(self):
        self.cond = threading.Condition()
        self.starts: dict[int, dict[str, dict]] = defaultdict(dict)  # round -> node -> first start there
        self.latest: dict[str, dict] = {}  # node -> its latest start
        self.done: dict[str, dict] = {}
        self.replies: dict[str, list[dict]] = defaultdict(list)  # ev -> messages (ready, launched, left, ended)
        self.closed: set[int] = set()  # processes whose output ended

    def put(self, index: int, msg: dict) -> None:
        with self.cond:
            ev = msg["ev"]
            if ev == "start":
                self.starts[msg["round"]].setdefault(msg["node"], msg)
                self.latest[msg["node"]] = msg
            elif ev == "done":
                self.done[msg["node"]] = msg
            else:
                self.replies[ev].append({**msg, "proc": index})
            self.cond.notify_all()

    def close(self, index: int) -> None:
        with self.cond:
            self.closed.add(index)
            self.cond.notify_all()

    def wait(self, ready, deadline: float) -> bool:
        with self.cond:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True


def _child_preexec():
    """Its own process group (killed as one), but this process's session: see "CPU" in the module doc."""
    pdeathsig = pdeathsig_preexec(os.getpid())

    def preexec() -> None:
        os.setpgid(0, 0)
        if pdeathsig is not None:
            pdeathsig()

    return preexec


class Child:
    """One process of K simulated agents (sim_proc.py) in its own process group, output read by a thread."""

    def __init__(self, index: int, nodes: list[str], board: Board, log_path: Path, init: dict):
        self.index, self.nodes, self.board = index, nodes, board
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "sim_proc.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, preexec_fn=_child_preexec())
        self.ps = psutil.Process(self.proc.pid)
        self._cpu, self._lock = 0.0, threading.Lock()
        threading.Thread(target=self._read, name=f"read-{index}", daemon=True).start()
        self.send(cmd="init", nodes=nodes, **init)

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            self.board.put(self.index, msg)
        self.board.close(self.index)

    def send(self, **msg) -> None:
        with self._lock:
            try:
                self.proc.stdin.write((json.dumps(msg) + "\n").encode())
                self.proc.stdin.flush()
            except (OSError, ValueError):
                pass  # it is gone; the board saw its output end

    def cpu(self) -> float:
        """user+sys seconds of the process (all its threads); the last reading once it is gone."""
        try:
            t = self.ps.cpu_times()
            self._cpu = t.user + t.system
        except psutil.Error:
            pass
        return self._cpu

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        for f in (self.proc.stdin, self._log):
            try:
                f.close()
            except OSError:
                pass


class Fleet:
    """The processes of one N: chunks of K agents, plus the victim alone in the last one."""

    def __init__(self, n: int, k: int):
        self.nodes = [f"n{i:04d}" for i in range(n)]
        self.victim = self.nodes[-1]
        rest = self.nodes[:-1]
        self.groups = [rest[i:i + k] for i in range(0, len(rest), k)] + [[self.victim]]
        self.children: list[Child] = []
        self.child_of: dict[str, Child] = {}

    def spawn(self, init: dict, workdir: Path, board: Board) -> None:
        for i, group in enumerate(self.groups):  # one by one: whatever was spawned is closed, even after an error
            child = Child(i, group, board, workdir / f"proc-{i:03d}.log", init)
            self.children.append(child)
            self.child_of.update((node, child) for node in group)

    def cpu(self) -> float:
        return sum(c.cpu() for c in self.children)

    def close(self) -> None:
        for c in self.children:
            c.send(cmd="quit")
        if os.environ.get("ETCD_AGENT_SIM_PROFILE"):  # each process writes its profile as it quits (sim_proc.py)
            deadline = time.monotonic() + 60
            for c in self.children:
                try:
                    c.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for c in self.children:
            c.kill()  # SIGKILL whatever did not quit yet, then reap


def schedstat(pid: int) -> tuple[float, float]:
    """(seconds run on a CPU, seconds spent runnable waiting for one) summed over the process's threads."""
    run = wait = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                r, w, _ = f.read().split()
            run, wait = run + int(r), wait + int(w)
    except (OSError, ValueError):
        pass
    return run / 1e9, wait / 1e9


def cpu_of(ps: psutil.Process | None) -> float:
    try:
        t = ps.cpu_times()
        return t.user + t.system
    except (psutil.Error, AttributeError):
        return 0.0


def prioritize(pid: int) -> str:
    """Run etcd ahead of the agent processes: its autogroup at nice -20 and each of its threads at nice -10 (both
    need root; what could not be done is said in the result)."""
    done = []
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write("-20")
        done.append("autogroup nice -20")
    except OSError as exc:
        done.append(f"autogroup unchanged ({exc.strerror})")
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), -10)
        done.append("threads nice -10")
    except OSError as exc:
        done.append(f"thread nice unchanged ({exc.strerror})")
    return ", ".join(done)


def count_lines(paths, text: str) -> int:
    """How many lines of these logs contain ``text`` (e.g. "session lost": an agent fenced itself)."""
    count = 0
    for path in paths:
        with open(path, errors="replace") as f:
            count += sum(text in line for line in f)
    return count
