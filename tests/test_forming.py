"""A round that waits for nodes, against the real etcd fixture, with agents in-process (a stand-in worker group):
the waiting line repeats every WAIT_NOTE_PERIOD (shortened here), saying what changed, how many are missing and the
time left; ``etcd-agent status`` shows the forming round (joined of --nnodes, who has not joined, the time left)."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time

import pytest

from etcd_agent.agent import Agent
from etcd_agent.cli.main import main
from etcd_agent.config import AgentConfig, EtcdConfig, JobSpec, WorkerConfig
from etcd_agent.coord import txns, waiting
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.errors import JobStopped
from etcd_agent.node.health import HealthConfig
from etcd_agent.testing import sim

SLOW_CHECK = HealthConfig(command=("sleep", "90"), timeout=100.0)  # far longer than the test: the node never joins


class Lines(logging.Handler):
    """The agents' INFO lines, per agent thread (``agent-<node>``), as they are logged."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.heard: dict[str, queue.Queue[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.INFO and record.threadName.startswith("agent-"):
            self.of(record.threadName[len("agent-"):]).put(record.getMessage())

    def of(self, node: str) -> queue.Queue[str]:
        return self.heard.setdefault(node, queue.Queue())

    def waiting(self, node: str, count: int, until=None) -> list[str]:
        """The next ``count`` waiting lines of ``node`` (or those up to the first that ``until`` accepts)."""
        got: list[str] = []
        while len(got) < count:
            line = self.of(node).get(timeout=30)
            line = line[line.index("] ") + 2:] if line.startswith("[") else line  # the run, node and round stamp
            if line.startswith(("waiting: ", "still waiting")):
                got.append(line)
                if until is not None and until(line):
                    break
        return got


@pytest.fixture
def lines(monkeypatch, caplog):
    monkeypatch.setattr(waiting, "WAIT_NOTE_PERIOD", 0.2)  # read at each call: the lines repeat every 0.2 s
    caplog.set_level(logging.INFO, logger="etcd_agent.agent")
    handler = Lines()
    logging.getLogger("etcd_agent.agent").addHandler(handler)
    yield handler
    logging.getLogger("etcd_agent.agent").removeHandler(handler)


def start(endpoint: str, run_id: str, node: str, nnodes: int, **kw) -> tuple[Agent, threading.Thread, dict]:
    cfg = AgentConfig(run_id=run_id, node_id=node, spec=JobSpec(nnodes, nnodes, "1", 0),
                      workers=WorkerConfig("unused.py", (), 1),
                      etcd=EtcdConfig(parse_endpoints(endpoint), request_timeout=1.0), lease_ttl=3,
                      local_addr="127.0.0.1", last_call=0.0, join_timeout=600.0, **kw)
    agent = Agent(cfg, "test", group_factory=sim.StandInGroup)
    thread, outcome = sim.run_in_thread(agent, f"agent-{node}")
    return agent, thread, outcome


def stop(agent: Agent, *runs: tuple[threading.Thread, dict]) -> None:
    assert txns.stop_job(agent.coord.etcd, agent.keys, "stopped by the test", time.time())
    for thread, outcome in runs:
        thread.join(30)
        assert isinstance(outcome.get("error"), JobStopped), outcome


def test_the_waiting_line_repeats_and_says_who_joined_how_many_are_missing_and_the_time_left(etcd_endpoint, run_id,
                                                                                             lines):
    a0, t0, o0 = start(etcd_endpoint, run_id, "n0", 3)
    said = lines.waiting("n0", 3)
    assert said[0].startswith("waiting: round 1 has 1 of 3 node(s); joined: n0 (1 of --nnodes 3); 2 more needed; "
                              "no other node registered; the round times out in ")
    assert said[0].endswith(" s (--join-timeout)")
    for line in said[1:]:  # nothing changed: the short line, again every period
        assert line.startswith("still waiting for 2 of 3 node(s) in round 1, ") and line.endswith(" s left "
                                                                                                "(--join-timeout)")
    a1, t1, o1 = start(etcd_endpoint, run_id, "n1", 3)
    changed = lines.waiting("n0", 50, until=lambda line: "n1 joined" in line)[-1]
    assert changed.startswith("waiting: round 1 has 2 of 3 node(s); n1 joined since the last line; joined: n0, n1 "
                              "(2 of --nnodes 3); 1 more needed; no other node registered; the round times out in ")
    assert lines.waiting("n0", 1)[0].startswith("still waiting for 1 of 3 node(s) in round 1, ")
    # n1 does not lead: it names its leader, and the time left as its own clock counts it
    joined = lines.waiting("n1", 50, until=lambda line: line.startswith("waiting: joined round 1"))[-1]
    assert joined.startswith("waiting: joined round 1; n0 leads it; the round times out in about ")
    assert lines.waiting("n1", 1)[0].startswith("still waiting: joined round 1; n0 leads it, about ")
    stop(a0, (t0, o0), (t1, o1))


def status(capsys, endpoint: str, run_id: str, *flags: str) -> str:
    capsys.readouterr()
    assert main(["status", "--etcd-endpoints", endpoint, "--run-id", run_id, *flags]) == 0
    return capsys.readouterr().out


def test_status_shows_a_forming_round_joined_of_nnodes_who_has_not_joined_and_the_time_left(etcd_endpoint, run_id,
                                                                                           lines, capsys):
    a0, t0, o0 = start(etcd_endpoint, run_id, "n0", 2)
    lines.waiting("n0", 1)
    a1, t1, o1 = start(etcd_endpoint, run_id, "n1", 2, health=SLOW_CHECK)  # registers, checks, never joins here
    lines.waiting("n0", 50, until=lambda line: "registered but not joined: n1 (checking its health)" in line)
    text = status(capsys, etcd_endpoint, run_id)
    assert "  joined so far: n0 (1 of --nnodes 2: 1 more needed)\n  registered, not joined: n1\n  times out in about " \
        in text
    assert " s (--join-timeout 600 s; the round opened " in text
    state = json.loads(status(capsys, etcd_endpoint, run_id, "--json"))
    forming = state["forming"]
    assert {k: forming[k] for k in ("round", "nodes_joined", "min_nodes", "max_nodes", "missing", "not_joined",
                                    "join_timeout")} == {"round": 1, "nodes_joined": 1, "min_nodes": 2,
                                                         "max_nodes": 2, "missing": 1, "not_joined": ["n1"],
                                                         "join_timeout": 600.0}
    assert 0 <= forming["times_out_in_s"] <= 600 and forming["age_s"] >= 0
    assert state["spec"]["join_timeout"] == 600.0
    stop(a0, (t0, o0), (t1, o1))


def test_a_job_whose_spec_records_no_join_timeout_shows_the_rounds_age_instead():
    """A spec written by an older agent has no join_timeout: status shows how long the round has been forming."""
    from etcd_agent.ops.status import forming, forming_lines
    from etcd_agent.schema.values import Phase, RoundInfo, SpecValue

    f = forming(RoundInfo(1, Phase.JOINING, time=100.0), SpecValue(2, 3, "1", 0), ["n0"], {"n0": {}, "n1": {}}, 130.0)
    assert f == {"round": 1, "nodes_joined": 1, "min_nodes": 2, "max_nodes": 3, "missing": 1, "not_joined": ["n1"],
                 "opened": 100.0, "age_s": 30.0, "join_timeout": None, "times_out_in_s": None}
    assert forming_lines({"joined": ["n0"], "forming": f}) == [
        "  joined so far: n0 (1 of --nnodes 2:3: 1 more needed)", "  registered, not joined: n1",
        "  the round opened 30 s ago (the job's spec records no --join-timeout)"]
    assert forming(RoundInfo(1, Phase.RUNNING, time=100.0), SpecValue(2, 3, "1", 0), [], {}, 130.0) is None
