"""The agent's state machine, driven in-process against the real etcd fixture with a stand-in worker group: the
states it passes through for a clean job, a worker failure with a restart, and a lost session (fencing)."""

from __future__ import annotations

import queue
import threading
import time

from etcd_agent.agent import Agent, State
from etcd_agent.config import AgentConfig, EtcdConfig, JobSpec, WorkerConfig, parse_endpoints
from etcd_agent.errors import JobFailed
from etcd_agent.workers import WorkerExit


class StandInGroup:
    """What the agent uses of a WorkerGroup; its "workers" end when the test says so (``finish``)."""

    started: "queue.Queue[StandInGroup]"  # set per test: every group that was started

    def __init__(self, cfg, on_exit, node_id=""):
        self.cfg, self._on_exit, self.node_id = cfg, on_exit, node_id
        self.assignment = None
        self._ended: set[int] = set()
        self._lock = threading.Lock()

    def start(self, a) -> None:
        self.assignment = a
        type(self).started.put(self)

    def _end(self, local_rank: int, code: int) -> None:
        with self._lock:
            if local_rank in self._ended:
                return
            self._ended.add(local_rank)
        a = self.assignment
        ex = WorkerExit(local_rank, a.rank_offset + local_rank, 0, code, time.time(), a.round)
        threading.Thread(target=self._on_exit, args=(ex,), daemon=True).start()  # never on the caller's thread

    def finish(self, code: int = 0, local_rank: int | None = None) -> None:
        for lr in range(self.cfg.nproc) if local_rank is None else [local_rank]:
            self._end(lr, code)

    def stop(self, reason: str = "", grace=None, sig: int = 15) -> None:
        if self.assignment is not None:
            self.finish(-sig)

    def failure_report(self, ex: WorkerExit) -> dict:
        return {"rank": ex.rank, "local_rank": ex.local_rank, "exitcode": ex.returncode, "signal": None,
                "message": f"stand-in exit {ex.returncode}", "time": ex.time, "round": ex.round,
                "node": self.node_id}

    def silent_for(self) -> list:
        return []

    def ended_on_its_own(self, ex: WorkerExit) -> bool:
        return False

    pids: list[int] = []

    @property
    def running(self) -> bool:
        return self.assignment is not None and len(self._ended) < self.cfg.nproc


class Recorded(Agent):
    """An Agent that records every state it enters."""

    def __init__(self, *args, **kwargs):
        self.states = [State.STARTING]
        super().__init__(*args, **kwargs)

    def _enter(self, new, why):
        super()._enter(new, why)
        if self.states[-1] is not new:
            self.states.append(new)


def start(endpoint: str, run_id: str, node: str, **kw) -> tuple[Recorded, threading.Thread, dict]:
    cfg = AgentConfig(run_id=run_id, node_id=node, spec=JobSpec(1, 1, "2", kw.pop("max_restarts", 0)),
                      workers=WorkerConfig("unused.py", (), 2),
                      etcd=EtcdConfig(parse_endpoints(endpoint), request_timeout=1.0), lease_ttl=3,
                      local_addr="127.0.0.1", last_call=0.0, **kw)
    agent = Recorded(cfg, "test", group_factory=StandInGroup)
    outcome: dict = {}

    def body():
        try:
            outcome["code"] = agent.run()
        except Exception as exc:  # noqa: BLE001 - the test inspects how the job ended
            outcome["error"] = exc
    thread = threading.Thread(target=body, name=f"agent-{node}", daemon=True)
    thread.start()
    return agent, thread, outcome


def next_group(timeout: float = 30.0) -> StandInGroup:
    return StandInGroup.started.get(timeout=timeout)


def test_a_clean_job_goes_starting_rendezvous_running_finished(etcd_endpoint, run_id):
    StandInGroup.started = queue.Queue()
    agent, thread, outcome = start(etcd_endpoint, run_id, "n0")
    group = next_group()
    assert (group.assignment.round, group.assignment.world_size) == (1, 2)
    group.finish(0)
    thread.join(30)
    assert outcome == {"code": 0}
    assert agent.states == [State.STARTING, State.RENDEZVOUS, State.RUNNING, State.FINISHED]


def test_a_failed_worker_restarts_the_job_then_the_budget_ends_it(etcd_endpoint, run_id):
    StandInGroup.started = queue.Queue()
    agent, thread, outcome = start(etcd_endpoint, run_id, "n0", max_restarts=1)
    next_group().finish(3, local_rank=1)
    second = next_group()
    assert (second.assignment.round, second.assignment.restart_count) == (2, 1)
    second.finish(3, local_rank=0)
    thread.join(30)
    assert isinstance(outcome.get("error"), JobFailed) and "restart budget is spent" in str(outcome["error"])
    assert agent.states == [State.STARTING, State.RENDEZVOUS, State.RUNNING, State.RENDEZVOUS, State.RUNNING,
                            State.FINISHED]


def test_a_lost_lease_fences_and_rejoins_with_a_new_session(etcd_endpoint, run_id):
    StandInGroup.started = queue.Queue()
    agent, thread, outcome = start(etcd_endpoint, run_id, "n0", max_restarts=1)  # its own loss is a restart
    first = next_group()
    lease = agent.session.lease_id
    agent.coord.etcd.lease_revoke(lease)  # as if etcd expired it: the keepalive hears "lease not found"
    second = next_group()
    assert second.assignment.round > first.assignment.round and not first.running
    assert agent.session.lease_id != lease
    assert State.FENCED in agent.states
    fenced = agent.states.index(State.FENCED)
    assert agent.states[fenced:fenced + 3] == [State.FENCED, State.RENDEZVOUS, State.RUNNING]
    second.finish(0)
    thread.join(30)
    assert outcome == {"code": 0}
