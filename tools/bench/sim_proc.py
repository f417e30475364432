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

Profiling: with ``ETCD_AGENT_SIM_PROFILE=DIR`` in the environment (scale.py's children inherit it), every thread of
the process is profiled by cProfile on its own CPU clock (``time.thread_time``: time a thread waits is not counted),
and ``quit`` first writes ``DIR/proc-<pid>.prof`` (all threads merged; read it with ``pstats``) and
``DIR/proc-<pid>.threads.json``: CPU seconds per kind of thread (what it runs: the agent loop, a watch stream,
gRPC's channel spin and request threads, a keepalive), read from each thread's CPU clock without the profiler.
cProfile makes Python code much slower (small functions most: a plan's decoding ten times and more), so read its
numbers as shares only; ``ETCD_AGENT_SIM_PROFILE=threads:DIR`` writes the thread table alone, without cProfile,
for the CPU itself. Either way ``DIR/proc-<pid>.calls.json`` counts the unary etcd calls (``Etcd.call``) by
operation and by the first caller outside the client. ``python tools/bench/sim_proc.py --report DIR [TOP]`` merges
every process's files and prints the thread table, the call counts and the TOP functions (default 30) by their own
time and by cumulative time.
"""

from __future__ import annotations

import cProfile
import collections
import dataclasses
import json
import logging
import os
import pstats
import re
import sys
import threading
import time

from etcd_agent.testing.sim import Done, Hub, JobParams, SimJob, Start

_out_lock = threading.Lock()
HERE = os.path.basename(__file__)


def emit(**msg) -> None:
    line = json.dumps(msg, separators=(",", ":")) + "\n"
    with _out_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


class Profile:
    """cProfile in every thread started from now on, on the thread's CPU clock, and CPU seconds per kind of thread
    (see the module doc); ``dump`` writes both."""

    def __init__(self, out: str):
        self.functions = not out.startswith("threads:")  # else: the thread table alone
        self.out = out.removeprefix("threads:")
        self.profiles: list[cProfile.Profile] = []
        self.ended: collections.Counter = collections.Counter()  # kind -> CPU seconds of its threads that ended
        self._lock = threading.Lock()
        run = threading.Thread.run
        profile = self

        def counted(thread: threading.Thread) -> None:  # each thread's own CPU, without the profiler's
            kind = _kind(thread)  # before run(), which forgets the target
            try:
                run(thread)
            finally:
                with profile._lock:
                    profile.ended[kind] += time.thread_time()
        threading.Thread.run = counted
        self.calls: collections.Counter = collections.Counter()  # (operation, call site) -> unary etcd calls
        self._count_calls()
        self.steps: collections.defaultdict = collections.defaultdict(lambda: [0, 0.0])  # part -> [calls, CPU s]
        self._time_steps()
        if self.functions:
            threading.setprofile(self._start)

    def _count_calls(self) -> None:
        """Count every unary etcd call (``Etcd.call``: txn, get, put, lease grant and revoke...) by operation and by
        the first caller outside the client: which part of the agent asks etcd what, and how often."""
        from etcd_agent.etcd.client import Etcd

        call, calls, lock = Etcd.call, self.calls, self._lock

        def counted(etcd, where, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.endswith((os.path.join("etcd", "client.py"), HERE)):
                frame = frame.f_back
            site = []
            for _ in range(2):  # the caller and its caller
                if frame is not None:
                    site.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}")
                    frame = frame.f_back
            site = " < ".join(site) or "?"
            op = re.sub(r"\s.*", "", where) if where.split(" ")[0] in _KEYED else re.sub(r"\d+", "#", where)
            with lock:
                calls[f"{op} <- {site}"] += 1
            return call(etcd, where, *args, **kwargs)
        Etcd.call = counted

    def _time_steps(self) -> None:
        """CPU seconds (the thread's own clock) and calls of the agent loop's parts (``TIMED``), inclusive: where a
        step's CPU goes, without cProfile's cost per Python call."""
        import importlib

        for where, name in TIMED:
            owner = importlib.import_module(where.rsplit(".", 1)[0]) if "." in where else None
            cls = getattr(owner, where.rsplit(".", 1)[1])
            fn = getattr(cls, name)
            label = f"{where.rsplit('.', 1)[1]}.{name}"

            def timed(*args, _fn=fn, _label=label, **kwargs):
                t0 = time.thread_time()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    spent = time.thread_time() - t0
                    with self._lock:
                        self.steps[_label][0] += 1
                        self.steps[_label][1] += spent
            setattr(cls, name, timed)

    def _start(self, frame, event, arg) -> None:
        sys.setprofile(None)
        prof = cProfile.Profile(time.thread_time)
        with self._lock:
            self.profiles.append(prof)
        prof.enable()

    def dump(self) -> None:
        threading.setprofile(None)
        cpu = collections.Counter(self.ended)
        for t in threading.enumerate():
            if t is not threading.main_thread() and t.ident is not None:
                try:
                    cpu[_kind(t)] += time.clock_gettime(time.pthread_getcpuclockid(t.ident))
                except OSError:
                    pass  # it ended just now
        os.makedirs(self.out, exist_ok=True)
        base = os.path.join(self.out, f"proc-{os.getpid()}")
        with open(base + ".threads.json", "w") as f:
            json.dump(dict(cpu.most_common()), f, indent=1)
        with open(base + ".calls.json", "w") as f:
            json.dump({"calls": dict(self.calls.most_common()), "steps": self.steps}, f, indent=1)
        # The calls that returned: a snapshot, not create_stats(), which would end the calls still in progress on
        # other threads (an agent waiting for its next event) with this thread's clock.
        stats = None
        for prof in list(self.profiles):
            prof.snapshot_stats()
            snap = _Snapshot(prof.stats)
            if stats is None:
                stats = pstats.Stats(snap)
            else:
                stats.add(snap)
        if stats is not None:
            stats.dump_stats(base + ".prof")


class _Snapshot:
    """What ``pstats.Stats`` takes: the ``stats`` of a profile, with nothing left to create."""

    def __init__(self, stats: dict):
        self.stats = stats

    def create_stats(self) -> None:
        pass


def report(out: str, top: int = 30) -> None:
    """Print what the profiled processes under ``out`` wrote (see the module doc)."""
    cpu: collections.Counter = collections.Counter()
    names = sorted(os.listdir(out))
    for name in names:
        if name.endswith(".threads.json"):
            with open(os.path.join(out, name)) as f:
                cpu.update(json.load(f))
    total = sum(cpu.values())
    procs = sum(n.endswith(".threads.json") for n in names)
    print(f"CPU by kind of thread, {total:.2f} s in all ({procs} process(es)):")
    for kind, seconds in cpu.most_common():
        print(f"  {seconds:8.2f} s {100 * seconds / max(total, 1e-9):5.1f}%  {kind}")
    calls: collections.Counter = collections.Counter()
    steps: collections.defaultdict = collections.defaultdict(lambda: [0, 0.0])
    for name in names:
        if name.endswith(".calls.json"):
            with open(os.path.join(out, name)) as f:
                got = json.load(f)
            calls.update(got["calls"])
            for part, (count, seconds) in got["steps"].items():
                steps[part][0] += count
                steps[part][1] += seconds
    print("the agent loop's parts (inclusive CPU of the calling thread):")
    for part, (count, seconds) in sorted(steps.items(), key=lambda item: -item[1][1]):
        print(f"  {seconds:8.2f} s {count:8d} calls {1e6 * seconds / max(count, 1):8.0f} us/call  {part}")
    print(f"unary etcd calls by operation <- call site, {sum(calls.values())} in all:")
    for what, count in calls.most_common():
        print(f"  {count:8d}  {what}")
    profs = [os.path.join(out, n) for n in names if n.endswith(".prof")]
    if profs:
        stats = pstats.Stats(*profs)
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)


# The agent loop's parts timed in a profile run: (module.class, method).
TIMED = (("etcd_agent.agent.Agent", "_step"), ("etcd_agent.agent.Agent", "_handle"),
         ("etcd_agent.agent.Agent", "_observe"), ("etcd_agent.agent.Agent", "_wait"),
         ("etcd_agent.agent.Agent", "_txn"), ("etcd_agent.agent.Agent", "_start"),
         ("etcd_agent.agent.Agent", "_stop"), ("etcd_agent.coord.coordinator.Coordinator", "maintain"),
         ("etcd_agent.coord.coordinator.Coordinator", "view"), ("etcd_agent.coord.coordinator.Coordinator", "open"),
         ("etcd_agent.coord.roles.Roles", "read_plan"), ("etcd_agent.coord.watches.Watches", "apply"),
         ("etcd_agent.etcd.client.Etcd", "call"))
_KEYED = ("get", "put", "delete", "count", "list")  # operations whose ``where`` names a key: counted by operation


def _kind(t: threading.Thread) -> str:
    target = getattr(t, "_target", None)
    return getattr(target, "__qualname__", t.name) if target is not None else type(t).__qualname__


def main() -> int:
    profile = Profile(os.environ["ETCD_AGENT_SIM_PROFILE"]) if os.environ.get("ETCD_AGENT_SIM_PROFILE") else None
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
            if profile is not None:
                profile.dump()
            break
    sys.stdout.flush()
    os._exit(0)  # no graceful leave, no thread joins: the benchmark's teardown must not wait on N agents


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report"]:
        report(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 30)
        sys.exit(0)
    sys.exit(main())
