"""decide(view, local, params) over hand-built views: blame (a lost node is its round's cause, never a
survivor) and the typed errors an agent raises for the job's end."""

from __future__ import annotations

import dataclasses

import pytest

from views import LOSS_SEEN, ME, NOW, PARAMS, WALL, finished_here, jn, me, mk_plan, report, running_here, view

from etcd_agent.coord import blame
from etcd_agent.coord.blame import Attribute, ReportLoss
from etcd_agent.coord.decide import Bump, End, Params, Wait, decide, job_error, result
from etcd_agent.errors import JobFailed, JobStopped, RendezvousTimeout, RestartBudgetSpent
from etcd_agent.coord.mirror import FAILED, JOINING, RUNNING, Scope, View
from etcd_agent.schema.values import Failure, Outcome, Result


# --- blame: a lost node is its round's cause, never a survivor ---------------------------------------------------

def lost_view(phase: str = JOINING, registered=(ME, "node-b"), joins=(ME, "node-b"), failures=None, **kwargs) -> View:
    """Round 4 after round 3 (node-a, node-b, node-c) restarted for node-a's worker failure at WALL - 2."""
    reports = {ME: report(ME, time=WALL - 2.0)} if failures is None else failures
    v = view(4, phase, nodes=registered, joins=joins, last_plan=mk_plan(3, [ME, "node-b", "node-c"]), **kwargs)
    return dataclasses.replace(v, last_failures={n: dataclasses.replace(f, round=3) for n, f in reports.items()})


def test_a_member_lost_just_after_its_rounds_failure_gets_a_loss_report():
    action = decide(lost_view(), me(), PARAMS)
    assert isinstance(action, ReportLoss)
    (loss,) = action.reports
    assert (loss.node, loss.round, loss.lost, loss.time) == ("node-c", 3, True, WALL)
    assert "node node-c was lost: its lease ended" in loss.message and loss.how_it_ended() == "lost"


def test_a_loss_report_also_comes_while_the_next_round_runs():
    v = lost_view(RUNNING)
    assert isinstance(decide(v, running_here(4), PARAMS), ReportLoss)


@pytest.mark.parametrize("case", ["long after", "still registered", "own report", "partial view", "loss reported",
                                  "no failure"])
def test_no_loss_report_where_none_is_due(case):
    kwargs = {
        "long after": dict(failures={ME: report(ME, time=WALL - 60.0)}),
        "still registered": dict(registered=(ME, "node-b", "node-c")),
        "own report": dict(failures={ME: report(ME, time=WALL - 2), "node-c": report("node-c", time=WALL - 3)}),
        "loss reported": dict(failures={ME: report(ME, time=WALL - 2),
                                        "node-c": blame.loss_report("node-c", 3, WALL - 1)}),
        "no failure": dict(failures={}),
    }.get(case, {})
    v = lost_view(**kwargs)
    if case == "partial view":
        v = dataclasses.replace(v, scope=Scope(False))
    assert not isinstance(decide(v, me(), PARAMS), ReportLoss)


def test_a_loss_report_is_the_rounds_cause_over_worker_failures_near_it():
    worker = report("node-b", time=WALL - 2.0)
    loss = blame.loss_report("node-c", 3, WALL)
    assert blame.root_cause([worker, loss]) is loss and blame.root_cause([worker]) is worker
    assert blame.attribution([worker, loss]) == ("round 3's failure is attributed to node-c, lost (its lease ended "
                                                 "2.0 s after node-b's worker rank 1 failed)")
    assert blame.attribution([worker]) == ""
    # the job's result too: the final round's loss report is its root cause
    v = view(3, failures={"node-b": worker, "node-c": loss}, nodes=(ME, "node-b", "node-c"))
    assert result(v.round, FAILED, WALL, v, "why", report(ME, time=WALL - 1.0)).root_cause == loss


def test_a_restart_for_a_lost_member_writes_its_loss_report_with_it():
    plan = mk_plan(3, [ME, "node-b", "node-c"])
    v = view(3, nodes=(ME, "node-b"), plan=plan, joins=(ME, "node-b"))
    action = decide(v, running_here(3), PARAMS)
    assert isinstance(action, Bump) and action.counted and [f.node for f in action.losses] == ["node-c"]
    assert action.losses[0].lost and action.losses[0].round == 3
    # not over a report of its own; and with the budget spent, the end's root cause is the loss
    v2 = view(3, nodes=(ME, "node-b"), plan=plan, joins=(ME, "node-b"), failures={"node-c": report("node-c")})
    assert decide(v2, running_here(3), PARAMS).losses == ()
    spent = view(3, nodes=(ME, "node-b"), plan=plan, joins=(ME, "node-b"), restarts=(3, 3),
                 failures={"node-b": report("node-b", time=WALL - 1)})
    end = decide(spent, running_here(3, lost_since=LOSS_SEEN), PARAMS)
    assert isinstance(end, End) and end.result.root_cause.node == "node-c" and end.result.root_cause.lost


def pending_view(**kwargs) -> View:
    return lost_view(registered=(ME, "node-b", "node-c"), **kwargs)


def test_a_failure_that_restarted_the_job_counts_once_no_loss_can_have_caused_it():
    mine = dataclasses.replace(report(ME, time=WALL - 2.0), round=3)
    waiting = me(pending=mine)
    # node-c is still registered but has not joined round 4: not known yet; it waits until the window ends
    action = decide(pending_view(joins=("node-b",)), waiting, PARAMS)
    assert isinstance(action, Wait) and action.deadline == pytest.approx(NOW - 2.0 + blame.window(PARAMS.lease_ttl))
    # every other member joined round 4: they were alive after the failure, so it counts
    assert decide(pending_view(joins=("node-b", "node-c")), waiting, PARAMS) == Attribute(mine, True)
    # a loss report in round 3: it does not count
    lost = {ME: mine, "node-c": blame.loss_report("node-c", 3, WALL - 1)}
    assert decide(pending_view(joins=("node-b",), failures=lost), waiting, PARAMS) == Attribute(mine, False)
    # the window passed with no loss: it counts
    late = me(pending=mine, wall=WALL + blame.window(PARAMS.lease_ttl))
    assert decide(pending_view(joins=("node-b",)), late, PARAMS) == Attribute(mine, True)


# --- what an agent raises for the job's end (typed errors) ------------------------------------------------------

def test_a_round_that_never_formed_ends_in_a_rendezvous_timeout():
    v = view(phase=JOINING, nodes=[ME, "node-d"], joins=[jn(ME, 11)])
    action = decide(v, me(now=NOW, round_seen_at=NOW - 60.0), Params(3, 4, 3, 2.0, 60.0, 1.0))
    assert isinstance(action, End) and job_error(action.result) is RendezvousTimeout
    unjoined = decide(view(phase=JOINING, nodes=[ME, "node-b"], joins=()),
                      me(now=NOW, round_seen_at=NOW - 60.0, unhealthy="GPU 0 is lost"), PARAMS)
    assert isinstance(unjoined, End) and unjoined.unjoined and job_error(unjoined.result) is RendezvousTimeout


def test_a_failure_or_a_loss_past_the_budget_ends_in_restart_budget_spent():
    failed = decide(view(restarts=(3, 3)), finished_here("failed", report()), PARAMS)
    lost = decide(view(nodes=[ME, "node-b"], joins=[ME], restarts=(3, 3)), running_here(lost_since=LOSS_SEEN), PARAMS)
    for action in (failed, lost):
        assert isinstance(action, End) and job_error(action.result) is RestartBudgetSpent, action.result.reason


def test_other_ends_are_plain_job_failures_or_stops_whatever_the_root_cause_says():
    partly = decide(view(exits=["node-b"], restarts=(0, 3)), finished_here("failed", report()), PARAMS)
    assert isinstance(partly, End) and job_error(partly.result) is JobFailed
    quoted = Failure(1, message="rendezvous timed out: the restart budget is spent (1 of 1 restarts used, "
                     "--max-restarts)", node="node-b")  # a worker's own words are no decision
    by_torch = Result(Outcome.FAILED, 3, "torchrun's agent on node-b gave up", quoted)
    assert job_error(by_torch) is JobFailed
    assert job_error(Result(Outcome.STOPPED, 3, "stopped by the operator")) is JobStopped


def test_loss_reports_go_at_most_max_loss_reports_per_txn():
    """Hundreds of members lost at once (a machine that starved its agents) fit etcd's 128 operations per txn: a
    restart writes the first reports with it, and each later ReportLoss the next ones."""
    from etcd_agent.coord.decide import MAX_LOSS_REPORTS
    lost = [f"node-{i:03d}" for i in range(3 * MAX_LOSS_REPORTS)]
    plan = mk_plan(3, [ME, "node-b", *lost])
    bump = decide(view(3, nodes=(ME, "node-b"), plan=plan, joins=(ME, "node-b")), running_here(3), PARAMS)
    assert isinstance(bump, Bump) and [f.node for f in bump.losses] == lost[:MAX_LOSS_REPORTS]
    v = lost_view()
    v = dataclasses.replace(v, last_plan=mk_plan(3, [ME, "node-b", *lost]))
    action = decide(v, me(), PARAMS)
    assert isinstance(action, ReportLoss) and [f.node for f in action.reports] == lost[:MAX_LOSS_REPORTS]
