"""The agent's state machine, driven in-process against the real etcd fixture with a stand-in worker group: the
states it passes through for a clean job, a worker failure with a restart, and a lost session (fencing)."""

from __future__ import annotations

import queue
import threading

from etcd_agent.agent import Agent, LostSession, State
from etcd_agent.config import AgentConfig, EtcdConfig, JobSpec, WorkerConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.errors import RestartBudgetSpent
from etcd_agent.testing import sim


class StandInGroup(sim.StandInGroup):
    """The simulation's stand-in worker group (etcd_agent/testing/sim.py); every group started goes to ``started``."""

    started: "queue.Queue[StandInGroup]"  # set per test

    def start(self, a) -> None:
        super().start(a)
        self.assignment = a
        type(self).started.put(self)


class Recorded(Agent):
    """An Agent that records every state it enters."""

    def __init__(self, *args, **kwargs):
        self.states = [State.STARTING]
        super().__init__(*args, **kwargs)

    def _enter(self, new, why, *args, **kw):
        super()._enter(new, why, *args, **kw)
        if self.states[-1] is not new:
            self.states.append(new)


def start(endpoint: str, run_id: str, node: str, group=StandInGroup, **kw) -> tuple[Recorded, threading.Thread, dict]:
    cfg = AgentConfig(run_id=run_id, node_id=node, spec=JobSpec(1, 1, "2", kw.pop("max_restarts", 0)),
                      workers=WorkerConfig("unused.py", (), 2),
                      etcd=EtcdConfig(parse_endpoints(endpoint), request_timeout=1.0), lease_ttl=3,
                      local_addr="127.0.0.1", last_call=0.0, **kw)
    agent = Recorded(cfg, "test", group_factory=group)
    thread, outcome = sim.run_in_thread(agent, f"agent-{node}")
    return agent, thread, outcome


def next_group(timeout: float = 30.0) -> StandInGroup:
    return StandInGroup.started.get(timeout=timeout)


def test_a_clean_job_goes_starting_rendezvous_running_finished(etcd_endpoint, run_id):
    StandInGroup.started = queue.Queue()
    agent, thread, outcome = start(etcd_endpoint, run_id, "n0")
    group = next_group()
    assert (group.assignment.round, group.assignment.world_size) == (1, 2)
    group.end(0)
    thread.join(30)
    assert outcome == {"code": 0}
    assert agent.states == [State.STARTING, State.RENDEZVOUS, State.RUNNING, State.FINISHED]


def test_a_failed_worker_restarts_the_job_then_the_budget_ends_it(etcd_endpoint, run_id):
    StandInGroup.started = queue.Queue()
    agent, thread, outcome = start(etcd_endpoint, run_id, "n0", max_restarts=1)
    next_group().end(3, local_rank=1)
    second = next_group()
    assert (second.assignment.round, second.assignment.restart_count) == (2, 1)
    second.end(3, local_rank=0)
    thread.join(30)
    assert isinstance(outcome.get("error"), RestartBudgetSpent) and "restart budget is spent" in str(outcome["error"])
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
    second.end(0)
    thread.join(30)
    assert outcome == {"code": 0}


class LosesItsSessionBeforeStarting(Recorded):
    """Its session is declared lost at the worst moment: the round's plan is in its mirror and the very next
    decision would start the workers."""

    injected = False

    def _drain(self, block, deadline=None):
        super()._drain(block, deadline)
        if (not self.injected and self.state is State.RENDEZVOUS and self.coord.mirror is not None
                and self.coord.mirror.plan(1) is not None):
            self.injected = True
            self.coord.etcd.lease_revoke(self.session.lease_id)
            self.events.put(LostSession(self.session, "lease revoked by the test"))
            super()._drain(False)


def test_a_session_lost_in_the_middle_of_a_step_never_starts_workers_on_the_old_view(etcd_endpoint, run_id):
    StandInGroup.started = queue.Queue()
    cfg = AgentConfig(run_id=run_id, node_id="n0", spec=JobSpec(1, 1, "2", 1), workers=WorkerConfig("unused.py", (), 2),
                      etcd=EtcdConfig(parse_endpoints(etcd_endpoint), request_timeout=1.0), lease_ttl=3,
                      local_addr="127.0.0.1", last_call=0.0)
    agent = LosesItsSessionBeforeStarting(cfg, "test", group_factory=StandInGroup)
    thread, outcome = sim.run_in_thread(agent)
    group = next_group()
    assert agent.injected and group.assignment.round == 2  # round 1's plan was never started into
    group.end(0)
    thread.join(30)
    assert outcome == {"code": 0}, outcome
    assert agent.states[:4] == [State.STARTING, State.RENDEZVOUS, State.FENCED, State.RENDEZVOUS]
