"""The invariants of a job that went through faults, checked from etcd's history and the workers' own records.

``check`` reads the job's whole history (`etcd-agent events --run-id R --json`: every change of the job's keys,
with its etcd revision), its state (`etcd-agent status --json`) and the records beat_worker.py left (round, rank,
host, restart count, start, newest heartbeat, end), waits until no process but slurmd is left on any node, and
asserts:

- one plan per round: each round that ran has exactly one plan in the history, round numbers open one after the
  other, and each worker ran under its round's plan (its group rank's member is its host, its world the plan's);
- no overlap: no worker of round N was alive (its end, or else its newest heartbeat: a worker killed by SIGKILL
  records no end) once a worker of a later round had started;
- every restart counted once: the budget's values in the history are 1, 2, ..., k, each written by the txn that
  opened a round (the same revision), every other round was opened by a scale-up, the budget and the result say
  k, and each round's workers got TORCHELASTIC_RESTART_COUNT = the restarts counted before its plan;
- no orphan process: nothing but slurmd left in any node's namespace after the job;
- the job's result (``outcome``).

It returns a summary (``Summary``) whose times let a test measure a fault's detection and recovery.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field

import psutil

from etcd_agent.testing import records as record_files

from .bed import NODES, Bed, etcd_endpoints
from .record import namespace_pids
from .slurm import records, status

ORPHAN_WAIT_S = 30.0  # slurmstepd ends a finished step's processes within seconds


def events(bed: Bed, run_id: str) -> list[dict]:
    """The job's history: `etcd-agent events --run-id RUN_ID --json`, one entry per change, in revision order."""
    done = subprocess.run(["etcd-agent", "events", "--run-id", run_id, "--json"],
                          env=bed.env(ETCD_AGENT_ENDPOINTS=etcd_endpoints()), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 0, f"etcd-agent events --run-id {run_id}: {done.stderr.strip()}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def left_on(host: str, keep: frozenset[int] | set[int] = frozenset()) -> list[str]:
    """The processes on ``host`` other than its slurmd and the ``keep`` pids (an sshd, say), as ``PID COMMAND``."""
    found = []
    for pid in namespace_pids(host):
        try:
            cmd = " ".join(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            continue
        if pid not in keep and "slurmd -D" not in cmd:
            found.append(f"{pid} {cmd}")
    return found


def wait_no_orphans(hosts=NODES, timeout: float = ORPHAN_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while leftovers := {h: cmds for h in hosts if (cmds := left_on(h))}:
        assert time.monotonic() < deadline, f"left running after the job: {leftovers}"
        time.sleep(0.05)  # process exits in another namespace have no event to wait on


@dataclass
class Round:
    number: int
    members: list[str]  # node ids in group-rank order
    plan_revision: int
    opened: float | None = None  # wall time the round was opened (its round key's time)
    reason: str = ""
    counted: bool = False  # its opening spent a restart
    started: float | None = None  # the first of its workers' starts
    last_alive: float | None = None  # the last time one of its workers was seen alive
    workers: int = 0
    restarts_before: int = 0  # restarts counted before its plan: its workers' TORCHELASTIC_RESTART_COUNT


@dataclass
class Summary:
    rounds: dict[int, Round] = field(default_factory=dict)  # the rounds that have a plan
    restarts: int = 0
    result: dict | None = None
    history: list[dict] = field(default_factory=list)

    def first_round_after(self, wall: float) -> Round:
        """The first round opened after wall time ``wall`` that ran workers."""
        later = [r for r in self.rounds.values() if r.opened and r.opened > wall and r.workers]
        assert later, f"no round with workers was opened after the fault: {self.describe()}"
        return min(later, key=lambda r: r.number)

    def describe(self) -> str:
        return "; ".join(f"round {r.number} ({r.reason or 'first'}{', counted' if r.counted else ''}): "
                         f"{','.join(r.members)}, {r.workers} workers" for r in self.rounds.values())


def check(bed: Bed, run_id: str, out, outcome: str = "succeeded") -> Summary:
    """Assert the invariants (module docstring) of job ``run_id`` whose workers recorded into ``out``."""
    wait_no_orphans()
    history = events(bed, run_id)
    state = status(bed, run_id)
    s = Summary(history=history, result=state["result"])
    assert s.result is not None and s.result["outcome"] == outcome, (state["result"], history)
    _rounds(s, history)
    _restarts(s, history, state)
    _workers(s, records(out))
    return s


def _rounds(s: Summary, history: list[dict]) -> None:
    opened = {e["round"]: e for e in history if e["event"] == "round opened"}
    numbers = sorted(opened)
    assert numbers == list(range(1, len(numbers) + 1)), f"rounds opened out of order: {numbers}"
    plans: dict[int, list[dict]] = {}
    for e in history:
        if e["event"] == "plan":
            plans.setdefault(e["round"], []).append(e)
    for number, found in plans.items():
        assert len(found) == 1, f"round {number} has {len(found)} plans: {found}"
        assert number in opened, f"a plan for round {number}, which was never opened: {found}"
        o = opened[number]
        s.rounds[number] = Round(number, found[0]["members"], found[0]["revision"], o.get("time"), o.get("reason"))


def _restarts(s: Summary, history: list[dict], state: dict) -> None:
    counted = [e for e in history if e["event"] == "restart counted"]
    assert [e["used"] for e in counted] == list(range(1, len(counted) + 1)), f"restarts counted: {counted}"
    opened_at = {e["revision"]: e["round"] for e in history if e["event"] == "round opened"}
    for e in counted:
        assert e["revision"] in opened_at, f"restart {e['used']} was counted outside a round's opening: {e}"
        if opened_at[e["revision"]] in s.rounds:
            s.rounds[opened_at[e["revision"]]].counted = True
    by_round = {opened_at[e["revision"]] for e in counted}
    for e in history:
        if e["event"] == "round opened" and e["round"] > 1 and e["round"] not in by_round:
            assert "scale-up" in (e.get("reason") or ""), f"round {e['round']} opened uncounted: {e}"
    s.restarts = len(counted)
    used = (state.get("restarts") or {}).get("used", 0)
    assert used == s.restarts == s.result.get("restarts", s.restarts), (state["restarts"], s.result, counted)
    for r in s.rounds.values():
        r.restarts_before = sum(e["revision"] < r.plan_revision for e in counted)


def _workers(s: Summary, found: dict[tuple[int, int], dict]) -> None:
    for (number, rank), rec in found.items():
        assert number in s.rounds, f"a worker of round {number}, which has no plan: {rec}"
        r, env = s.rounds[number], rec["env"]
        group_rank = int(env["GROUP_RANK"])
        assert group_rank < len(r.members) and r.members[group_rank].split("-")[0] == rec["host"], (r, rec)
        assert int(env["TORCHELASTIC_RESTART_COUNT"]) == r.restarts_before, (r, rec)
        r.workers += 1
        start, alive = rec.get("start", rec["time"]), rec.get("end") or rec.get("beat") or rec["time"]
        r.started = start if r.started is None else min(r.started, start)
        r.last_alive = alive if r.last_alive is None else max(r.last_alive, alive)
    ran = sorted(n for n, r in s.rounds.items() if r.workers)
    for i, n in enumerate(ran):
        for later in ran[i + 1:]:
            a, b = s.rounds[n], s.rounds[later]
            assert a.last_alive < b.started, (
                f"a worker of round {n} was alive {a.last_alive - b.started:.2f} s after a worker of round "
                f"{later} started: "
                f"{sorted((k, v.get('start'), v.get('beat'), v.get('end')) for k, v in found.items())}")


def wait_round(out, number: int, world: int, timeout: float, steps: int = 0) -> dict[tuple[int, int], dict]:
    """Wait until ranks 0..world-1 of round ``number`` have recorded (and, with ``steps``, each has done that many
    ring steps); returns every record."""
    wanted = {(number, r) for r in range(world)}
    last: dict = {}

    def done() -> dict | None:
        last.update(found := records(out))
        return found if wanted <= set(found) and all(found[k].get("steps", 0) >= steps for k in wanted) else None
    try:
        return record_files.wait_until(done, timeout, f"round {number} with {world} workers"
                                       f"{f' at {steps} steps' if steps else ''}", out)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {sorted((k, v.get('steps')) for k, v in last.items())}") from None


def of_round(found: dict, number: int) -> dict[int, dict]:
    """rank -> record, for round ``number``."""
    return {rank: rec for (rnd, rank), rec in found.items() if rnd == number}


def wait_running(bed: Bed, run_id: str, out, world: int, timeout: float) -> int:
    """Wait until the job's current round runs with ``world`` workers, each of which recorded; returns its number."""
    deadline = time.monotonic() + timeout
    while True:
        state = status(bed, run_id)
        rnd, found = state["round"] or {}, records(out)
        number = rnd.get("round")
        if rnd.get("phase") == "running" and {r for n, r in found if n == number} == set(range(world)):
            return number
        assert time.monotonic() < deadline, f"the job not running with {world} workers within {timeout} s: {state}"
        time.sleep(0.2)  # `status` reads etcd once: polled
