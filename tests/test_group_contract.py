"""The worker-group contract (etcd_agent/node/api.py) and the agent's two dispatch tables, without etcd: which group
event a round's exits make (``ExitTally``), that every group implements ``Group``, and that every event type posted
to the agent's queue and every action ``decide`` returns has a handler."""

from __future__ import annotations

import ast
import queue
import typing
from pathlib import Path

import pytest

from etcd_agent import agent as agent_mod
from etcd_agent.agent import Agent, QueueEvent
from etcd_agent.config import AgentConfig, EtcdConfig, JobSpec, WorkerConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.coord import decide
from etcd_agent.logs import get as get_logger
from etcd_agent.node.api import ExitTally, Group, GroupFailed, GroupSucceeded, WorkerExit
from etcd_agent.node.workers import WorkerGroup
from etcd_agent.schema.values import Failure
from etcd_agent.testing.sim import StandInGroup
from etcd_agent.torch.group import TorchrunWorkers

PACKAGE = Path(__file__).resolve().parents[1] / "etcd_agent"
CFG = AgentConfig(run_id="r", node_id="n0", spec=JobSpec(1, 1, "2", 0), workers=WorkerConfig("unused.py", (), 2),
                  etcd=EtcdConfig(parse_endpoints("127.0.0.1:1")))


def ex(local_rank: int, code: int, rnd: int = 4) -> WorkerExit:
    return WorkerExit(local_rank, 10 + local_rank, 100 + local_rank, code, 1.0, rnd)


def report_of(e: WorkerExit) -> Failure:
    return Failure(e.rank, e.local_rank, e.pid, e.returncode, e.signal_name, "boom", round=e.round)


def tally(nproc: int = 3) -> ExitTally:
    return ExitTally(4, nproc, get_logger("etcd_agent.test"))


# --- ExitTally ------------------------------------------------------------------------------------------------

def test_every_worker_exiting_0_is_one_success():
    t = tally()
    assert [t.exit(ex(i, 0), True, lambda: pytest.fail("no report")) for i in range(3)] == [None, None,
                                                                                             GroupSucceeded(4)]


def test_the_first_failure_of_its_own_is_the_groups_and_later_ones_are_only_said(caplog):
    t = tally()
    made = []
    first = t.exit(ex(1, 3), True, lambda: made.append(1) or report_of(ex(1, 3)))
    assert first == GroupFailed(4, report_of(ex(1, 3))) and made == [1]
    with caplog.at_level("WARNING", logger="etcd_agent.test"):
        assert t.exit(ex(0, -9), True, lambda: pytest.fail("a later failure makes no report")) is None
    assert [m for m in caplog.messages if "failed too" in m] == ["worker rank 10 (pid 100) failed too, with signal "
                                                                 "SIGKILL"]
    assert t.exit(ex(2, 0), True, lambda: None) is None  # all exited, but it failed: no success


def test_an_exit_a_stop_caused_is_no_failure_and_no_success():
    t = tally(2)
    assert t.exit(ex(0, -15), False, lambda: pytest.fail("our SIGTERM is no failure")) is None
    assert t.exit(ex(1, 0), False, lambda: None) is None  # every worker exited, not every one with 0


def test_a_hang_is_the_first_failure_only_once():
    t = tally()
    assert t.hung() and not t.hung()
    assert t.exit(ex(0, 1), True, lambda: pytest.fail("the hang was the failure")) is None
    t2 = tally()
    t2.exit(ex(0, 1), True, lambda: report_of(ex(0, 1)))
    assert not t2.hung()  # a failure came first: the hang is not posted


# --- the groups implement the contract --------------------------------------------------------------------------

def test_every_group_implements_the_protocol():
    post = queue.SimpleQueue().put
    groups = [WorkerGroup(CFG.workers, post, node_id="n0"), StandInGroup(CFG.workers, post, node_id="n0"),
              TorchrunWorkers(handler=None, post=post, node_id="n0")]
    for g in groups:
        assert isinstance(g, Group), type(g).__name__
        assert not g.stopped_pids  # nothing stopped yet: nothing to drain


def test_no_module_probes_a_group_with_getattr():
    """What the agent and the checks need of a group is in the protocol: nothing looks for optional attributes."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr") and \
                    any("group" in ast.unparse(a) for a in node.args[:1]):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found


# --- the agent's tables ------------------------------------------------------------------------------------------

POSTERS = ("post", "_post", "sink", "_sink", "put")  # the callables events reach the agent's queue through


def posted_types() -> set[str]:
    """The classes constructed directly in a posting call anywhere in the package (``self.events.put(Leave(...))``,
    ``self._post(GroupFailed(...))``), plus those a posting helper returns (``ExitTally.exit``, check threads)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Call):
                continue
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            inner = node.args[0].func
            name = inner.attr if isinstance(inner, ast.Attribute) else getattr(inner, "id", "")
            receiver = ast.unparse(node.func)
            if func in POSTERS and name[:1].isupper() and (func != "put" or "events" in receiver):
                names.add(name)
    return names


def test_every_event_type_has_exactly_one_handler():
    agent = Agent(CFG, "test")
    declared = set(typing.get_args(QueueEvent))
    assert set(agent.on_event) == declared, "QueueEvent and the handler table differ"
    unhandled = posted_types() - {t.__name__ for t in agent.on_event}
    assert not unhandled, f"posted to the agent's queue but not handled: {sorted(unhandled)}"
    assert {"Leave", "LostSession", "Signalled", "GroupFailed"} <= posted_types()  # the scan sees the posts


def test_every_action_decide_returns_has_a_handler():
    agent = Agent(CFG, "test")
    actions = set(typing.get_args(decide.Action))
    assert actions == set(agent.on_action), "decide.Action and the agent's action table differ"
    assert set(agent_mod.Coordinator.TXNS) <= actions
