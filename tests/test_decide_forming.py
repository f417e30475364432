"""decide(view, local, params) over hand-built views while a round forms: the job's result and the round key,
joining and closing the round, health readiness and scale-ups that did not admit their newcomers."""

from __future__ import annotations

import dataclasses

import pytest

from views import ME, NOW, PARAMS, WALL, jn, me, mk_plan, partial, running_here, view

from etcd_agent.coord.decide import (Bump, CheckHealth, ClosePlan, End, Finish, JoinRound, Params, StopWorkers, Wait,
                                     decide, newcomers, passed_over)
from etcd_agent.coord.mirror import DONE, FAILED, JOINING, STOPPED, View
from etcd_agent.schema.values import NodeInfo, Outcome, Result


# --- the job's result and the round key ------------------------------------------------------------------------

def test_result_present_finishes():
    res = Result(Outcome.SUCCEEDED, 3)
    assert decide(view(result=res), me(), PARAMS) == Finish(res)


def test_result_present_stops_running_workers_first():
    res = Result(Outcome.STOPPED, 3)
    action = decide(view(result=res), running_here(), PARAMS)
    assert isinstance(action, StopWorkers)


def test_no_round_key_waits():
    assert isinstance(decide(view(round_present=False, phase=JOINING), me(), PARAMS), Wait)


@pytest.mark.parametrize("phase", [DONE, FAILED, STOPPED])
def test_final_phase_without_result_waits_for_the_result(phase):
    action = decide(view(phase=phase, plan=mk_plan(3, [ME, "node-b"])), me(), PARAMS)
    assert isinstance(action, Wait)
    assert phase in action.why


# --- joining ---------------------------------------------------------------------------------------------------

def test_registered_but_not_joined_joins_the_round():
    v = view(phase=JOINING, joins=["node-b"])
    assert decide(v, me(), PARAMS) == JoinRound(v.round)


def test_not_registered_waits_for_its_registration():
    v = view(phase=JOINING, nodes=["node-b"], joins=["node-b"])
    action = decide(v, me(), PARAMS)
    assert isinstance(action, Wait)
    assert "registration" in action.why


def test_leader_is_the_lowest_join_create_revision_and_others_wait():
    v = view(phase=JOINING, nodes=[ME, "node-b", "node-c"], joins=[jn(ME, 12), jn("node-b", 11)])
    action = decide(v, me(round_seen_at=NOW - 1, min_reached_at=NOW - 10), PARAMS)
    assert isinstance(action, Wait)
    assert "node-b leads" in action.why
    assert action.deadline is None  # min reached: only the leader has a timer


def test_non_leader_below_min_waits_until_the_join_timeout():
    p = Params(3, 4, 3, 2.0, 60.0, 1.0)
    v = view(phase=JOINING, nodes=[ME, "node-b", "node-c"], joins=[jn(ME, 12), jn("node-b", 11)])
    action = decide(v, me(round_seen_at=NOW - 1), p)
    assert isinstance(action, Wait)
    assert action.deadline == NOW - 1 + p.join_timeout


def test_leader_with_min_and_every_registered_node_joined_closes_at_once():
    v = view(phase=JOINING, nodes=[ME, "node-b"], joins=[jn(ME, 11), jn("node-b", 12)],
             last_plan=mk_plan(2, [ME, "node-b", "node-c"]))
    action = decide(v, me(round_seen_at=NOW, min_reached_at=NOW), Params(2, 4, 3, 30.0, 60.0, 1.0))
    assert isinstance(action, ClosePlan)
    assert action.round == v.round
    assert action.plan.nodes == [ME, "node-b"]
    assert action.plan.round == 3


def test_leader_with_max_joiners_closes_although_a_registered_node_is_missing():
    p = Params(2, 3, 3, 30.0, 60.0, 1.0)
    v = view(phase=JOINING, nodes=[ME, "node-b", "node-c", "node-d"],
             joins=[jn(ME, 11), jn("node-b", 12), jn("node-c", 13)])
    action = decide(v, me(round_seen_at=NOW, min_reached_at=NOW), p)
    assert isinstance(action, ClosePlan)
    assert action.plan.nodes == [ME, "node-b", "node-c"]


def test_leader_with_min_but_an_unjoined_registered_node_waits_for_last_call_then_closes():
    v = view(phase=JOINING, nodes=[ME, "node-b", "node-c"], joins=[jn(ME, 11), jn("node-b", 12)])
    reached = NOW - 0.5
    action = decide(v, me(round_seen_at=NOW - 5, min_reached_at=reached), PARAMS)
    assert isinstance(action, Wait)
    assert action.deadline == reached + PARAMS.last_call
    assert "last call" in action.why

    later = decide(v, me(now=reached + PARAMS.last_call, round_seen_at=NOW - 5, min_reached_at=reached), PARAMS)
    assert isinstance(later, ClosePlan)
    assert later.plan.nodes == [ME, "node-b"]


def test_leader_that_has_not_noted_min_reached_starts_last_call_now():
    v = view(phase=JOINING, nodes=[ME, "node-b", "node-c"], joins=[jn(ME, 11), jn("node-b", 12)])
    action = decide(v, me(round_seen_at=NOW - 5, min_reached_at=None), PARAMS)
    assert isinstance(action, Wait)
    assert action.deadline == NOW + PARAMS.last_call


def test_leader_below_min_waits_until_the_join_timeout():
    v = view(phase=JOINING, nodes=[ME, "node-b"], joins=[jn(ME, 11)])
    action = decide(v, me(round_seen_at=NOW - 1), PARAMS)
    assert isinstance(action, Wait)
    assert action.deadline == NOW - 1 + PARAMS.join_timeout


def test_fewer_than_min_past_the_join_timeout_fails_naming_the_missing_nodes():
    last = mk_plan(2, [ME, "node-b", "node-c"])
    v = view(phase=JOINING, nodes=[ME, "node-d"], joins=[jn(ME, 11)], last_plan=last)
    p = Params(3, 4, 3, 2.0, 60.0, 1.0)
    action = decide(v, me(now=NOW, round_seen_at=NOW - 60.0), p)
    assert isinstance(action, End)
    assert action.phase == FAILED
    assert action.round == v.round
    reason = action.result.reason
    assert "node-b" in reason and "node-c" in reason  # from the previous plan, gone from the registry
    assert "node-d" in reason  # registered but not joined
    assert "--join-timeout" in reason
    assert f"{ME}," not in reason and not reason.endswith(ME)
    assert action.result.outcome == FAILED
    assert action.result.round == 3
    assert action.result.time == WALL


def test_join_timeout_not_yet_reached_does_not_fail():
    v = view(phase=JOINING, nodes=[ME], joins=[jn(ME, 11)])
    action = decide(v, me(now=NOW, round_seen_at=NOW - 59.9), PARAMS)
    assert isinstance(action, Wait)


def test_close_plan_records_the_restart_count():
    v = view(phase=JOINING, nodes=[ME, "node-b"], joins=[jn(ME, 11), jn("node-b", 12)], restarts=(2, 3),
             last_plan=mk_plan(2, [ME, "node-b"]))
    action = decide(v, me(min_reached_at=NOW), PARAMS)
    assert isinstance(action, ClosePlan)
    assert action.plan.restart_count == 2
    assert action.plan.max_restarts == PARAMS.max_restarts


# --- health readiness and scale-ups that did not admit their newcomers --------------------------------------------

def registry(v: View, node: str, rev: int, **fields) -> View:
    """``v`` with ``node``'s registry entry written at revision ``rev`` (and the given NodeInfo fields)."""
    return dataclasses.replace(v, nodes={**v.nodes, node: NodeInfo(node, f"host-{node}", pid=1, mod_revision=rev,
                                                                   **fields)})


def scaled_for(v: View, rev: int | None) -> View:
    return dataclasses.replace(v, round=dataclasses.replace(v.round, scaled_for=rev))


def test_a_newcomer_still_checking_its_health_does_not_scale_the_job_up_until_a_check_passed():
    v = view(nodes=[ME, "node-b"], plan=mk_plan(3, [ME, "node-b"]))
    later = running_here(now=NOW + 10, newcomers_since=NOW)
    assert isinstance(decide(registry(v, "node-new", 40, checking=True), later, PARAMS), Wait)
    action = decide(registry(v, "node-new", 41), later, PARAMS)
    assert isinstance(action, Bump) and not action.counted and action.scaled_for == 41


def test_a_scale_up_that_did_not_admit_its_newcomer_is_not_repeated_until_its_entry_changes():
    v = scaled_for(registry(view(nodes=[ME, "node-b"], plan=mk_plan(3, [ME, "node-b"])), "node-x", 41), 41)
    later = running_here(now=NOW + 10, newcomers_since=NOW)
    assert passed_over(v) == {"node-x"} and newcomers(v) == []
    assert isinstance(decide(v, later, PARAMS), Wait)
    again = registry(v, "node-x", 57)  # it rewrote its entry: ready again
    assert passed_over(again) == set()
    assert isinstance(decide(again, later, PARAMS), Bump)
    other = registry(v, "node-new", 60)  # another newcomer: the scale-up is for it only
    action = decide(other, later, PARAMS)
    assert isinstance(action, Bump) and "node-new" in action.reason and "node-x" not in action.reason
    assert action.scaled_for == 60


def test_a_node_outside_the_running_round_checks_before_it_counts_and_says_so_again_when_passed_over():
    v = view(nodes=[ME, "node-b"], plan=mk_plan(3, ["node-b"]), joins=["node-b"])
    assert decide(registry(v, ME, 40, checking=True), me(ready=False), PARAMS) == CheckHealth(v.round)
    assert isinstance(decide(registry(v, ME, 40, checking=True), me(ready=False, checking=True), PARAMS), Wait)
    assert isinstance(decide(registry(v, ME, 40), me(), PARAMS), Wait)  # ready: the leader scales up for it
    passed = scaled_for(registry(v, ME, 40), 40)
    assert decide(passed, me(), PARAMS) == CheckHealth(passed.round, announce=True)
    assert isinstance(decide(registry(passed, ME, 45), me(), PARAMS), Wait)  # it said so: waiting again


def test_the_fast_path_does_not_wait_for_a_node_still_checking():
    p = Params(2, 4, 3, 30.0, 60.0, 1.0)
    v = view(phase=JOINING, nodes=[ME, "node-b"], joins=[jn(ME, 11), jn("node-b", 12)],
             last_plan=mk_plan(2, [ME, "node-b"]))
    assert isinstance(decide(v, me(round_seen_at=NOW, min_reached_at=NOW), p), ClosePlan)
    assert isinstance(decide(registry(v, "node-c", 40), me(round_seen_at=NOW, min_reached_at=NOW), p), Wait)
    action = decide(registry(v, "node-c", 40, checking=True), me(round_seen_at=NOW, min_reached_at=NOW), p)
    assert isinstance(action, ClosePlan) and action.plan.nodes == [ME, "node-b"]


def test_when_nobody_joins_an_unhealthy_node_times_the_round_out_naming_the_unhealthy_nodes():
    v = view(phase=JOINING, number=1, nodes=[ME, "node-b"], joins=[])
    v = registry(registry(v, ME, 40, health="no GPU"), "node-b", 41, health="exit code 1: disk full")
    sick = dict(unhealthy="no GPU", health_retry_at=NOW + 5)
    early = decide(v, me(round_seen_at=NOW - 30, **sick), PARAMS)
    assert isinstance(early, Wait) and early.deadline == NOW + 5 and early.timeout_at == NOW + 30
    soon = decide(v, me(round_seen_at=NOW - 58, **sick), PARAMS)
    assert soon.deadline == soon.timeout_at == NOW + 2  # it wakes for the timeout, not only for its next check
    action = decide(v, me(round_seen_at=NOW - 60, **sick), PARAMS)
    assert isinstance(action, End) and action.phase == FAILED and action.unjoined
    assert action.result.reason == ("rendezvous timed out: 0 of at least 2 node(s) joined round 1 within 60 s "
                                    "(--join-timeout); missing: node-a (unhealthy: no GPU), node-b (unhealthy: "
                                    "exit code 1: disk full)")
    joined = dataclasses.replace(v, joins={"node-b": jn("node-b", 12)})  # a joiner leads, and times the round out
    waiting = decide(joined, me(round_seen_at=NOW - 60, **sick), PARAMS)
    assert isinstance(waiting, Wait) and waiting.deadline == NOW + 5 and waiting.timeout_at is None
    unwatched = partial(v, "node-b")  # a node that does not watch the round never reads an absence as a fact
    assert isinstance(decide(unwatched, me(round_seen_at=NOW - 60, **sick), PARAMS), Wait)


def test_only_a_wait_the_join_timeout_bounds_says_when_the_round_times_out():
    v = view(phase=JOINING, number=1, joins=[jn(ME, 11)])
    few = decide(v, me(round_seen_at=NOW - 1), Params(2, 4, 3, 2.0, 60.0, 1.0))
    assert few.timeout_at == few.deadline == NOW - 1 + 60.0
    last_call = decide(v, me(round_seen_at=NOW - 1, min_reached_at=NOW), Params(1, 4, 3, 2.0, 60.0, 1.0))
    assert last_call.deadline == NOW + 2.0 and last_call.timeout_at is None
