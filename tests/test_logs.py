"""One log format: every agent line says run, node and round (logs.py); a worker failure is logged once."""

from __future__ import annotations

import logging
import re

from agents import job_keys, keys_of, start_agents, wait_all

from etcd_agent import logs

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) etcd-agent: (.*)$")
STAMP = re.compile(r"^\[run (\S+) node (\S+) round (\d+|-)\] ")


def agent_lines(stderr: str) -> list[tuple[str, str]]:
    """(level, message) of every line the agent logged (worker output is not the agent's)."""
    return [(m.group(1), m.group(2)) for m in map(LINE.match, stderr.splitlines()) if m]


def test_every_line_of_a_job_with_a_crash_says_run_node_and_round_and_the_failure_is_logged_once(
        etcd_endpoint, run_id, tmp_path):
    agents, _out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--fail-rank", "3"],
                                extra=["--max-restarts", "1"])
    assert wait_all(agents) == [0, 0], [a.stderr()[-2000:] for a in agents]
    errors = {}
    for a in agents:
        lines = agent_lines(a.stderr())
        assert len(lines) > 10
        stamped = [(level, STAMP.match(msg), msg) for level, msg in lines]
        # from the agent's first contact with etcd to its exit, every line carries the stamp
        first = next(i for i, (_lvl, m, _msg) in enumerate(stamped) if m)
        unstamped = [msg for _lvl, m, msg in stamped[first:] if not m]
        assert unstamped == [], unstamped
        for _lvl, m, _msg in stamped[first:]:
            assert m.group(1) == run_id and m.group(2) == a.node
        about = [(lvl, msg) for lvl, m, msg in stamped if "worker rank 3" in msg and "exit code 3" in msg]
        errors[a.node] = [msg for lvl, msg in about if lvl == "ERROR"]
        # the restart the failure caused is its own line; no other warning repeats the failure
        assert [msg for lvl, msg in about if lvl == "WARNING" and "restarting the job" not in msg] == []
        assert not any("Run " in msg for _lvl, msg in lines)  # the old second format is gone
    # the failure once, as an ERROR of the node it happened on, in the round it happened in
    keys = job_keys(etcd_endpoint, run_id)
    failed_on = [n for n in errors if keys_of(run_id).failure(1, n) in keys]
    assert len(failed_on) == 1, errors
    assert sum(map(len, errors.values())) == 1 and len(errors[failed_on[0]]) == 1, errors
    assert errors[failed_on[0]][0].startswith(f"[run {run_id} node {failed_on[0]} round 1] worker rank 3 (pid ")


def test_a_line_about_an_earlier_round_says_that_round(caplog):
    where = logs.Where("job1", "node-a")
    log = logs.get("etcd_agent.test", where)
    with caplog.at_level(logging.INFO, logger="etcd_agent.test"):
        log.info("before any round")
        where.round = 4
        log.info("now in %s", "round 4")
        log.info("a worker of round 3 exited", round=3)
    assert [r.getMessage() for r in caplog.records] == [
        "[run job1 node node-a round -] before any round", "[run job1 node node-a round 4] now in round 4",
        "[run job1 node node-a round 3] a worker of round 3 exited"]


def test_module_lines_take_the_one_agent_of_the_process(caplog):
    plain = logs.get("etcd_agent.test")
    a, b = logs.Where("job1", "node-a"), logs.Where("job1", "node-b")
    with caplog.at_level(logging.INFO, logger="etcd_agent.test"):
        plain.info("no agent yet")
        logs.running(a)
        plain.info("one agent")
        logs.running(b)
        plain.info("two agents: which one is not known")
        logs.stopped(a)
        logs.stopped(b)
    assert [r.getMessage() for r in caplog.records] == [
        "no agent yet", "[run job1 node node-a round -] one agent", "two agents: which one is not known"]
