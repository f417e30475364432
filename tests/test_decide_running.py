"""decide(view, local, params) over hand-built views of a running round: failures, losses, exits, scale-up,
and what an agent that does not lead the round sees."""

from __future__ import annotations

import dataclasses

import pytest

from views import LOSS_SEEN, ME, NOW, PARAMS, finished_here, jn, me, mk_plan, partial, report, running_here, view

from etcd_agent.coord.decide import (LOSS_END_GRACE, Bump, ClosePlan, End, JoinRound, Params, StartWorkers, StopWorkers,
                                     Wait, WriteExit, decide)
from etcd_agent.coord.mirror import DONE, FAILED, JOINING, RUNNING
from etcd_agent.schema.values import Join


# --- running ---------------------------------------------------------------------------------------------------

def test_member_whose_workers_have_not_started_starts_them():
    v = view()
    assert decide(v, me(), PARAMS) == StartWorkers(v.plan, v.plan.member(ME))


def test_member_whose_workers_ran_in_an_older_round_starts_them_for_this_round():
    v = view(number=4)
    stopped = me(workers_round=3, workers_running=False, outcome="failed", failure=report())
    action = decide(v, stopped, PARAMS)
    assert action == StartWorkers(v.plan, v.plan.member(ME))


def test_spare_node_waits():
    v = view(nodes=[ME, "node-b", "node-c"], plan=mk_plan(3, ["node-b", "node-c"]))
    action = decide(v, me(), PARAMS)
    assert isinstance(action, Wait)
    assert "without this node" in action.why
    assert "full" not in action.why


def test_spare_node_of_a_full_round_says_so():
    p = Params(1, 2, 3, 2.0, 60.0, 1.0)
    v = view(nodes=[ME, "node-b", "node-c"], plan=mk_plan(3, ["node-b", "node-c"]))
    action = decide(v, me(), p)
    assert isinstance(action, Wait)
    assert "full" in action.why


def test_a_member_whose_join_key_is_from_its_lost_session_moves_the_job_on():
    # It fenced and came back with lease 7; the plan was made with its old join key (lease 0): never start into it.
    action = decide(view(), me(lease=7), PARAMS)
    assert isinstance(action, Bump) and f"{ME} left" in action.reason


def test_a_fenced_agent_rejoins_a_joining_round_with_its_new_lease():
    v = view(phase=JOINING, nodes=[ME, "node-b"], joins=[jn(ME, 11), jn("node-b", 12)])
    assert isinstance(decide(v, me(lease=7), PARAMS), JoinRound)


def test_every_member_fenced_while_joining_does_not_deadlock():
    # All rejoined round 3 with new leases and the leader closed it: the plan is valid, workers start.
    joins = [Join(ME, 11, "h", "a", 1, 2, None, 7), Join("node-b", 12, "h", "b", 1, 2, None, 8)]
    v = view(nodes=[ME, "node-b"], joins=joins)
    assert isinstance(decide(v, me(lease=7), PARAMS), StartWorkers)


@pytest.mark.parametrize("members", [[ME], [ME, "node-b"]])
def test_when_every_member_was_fenced_someone_moves_the_job_on(members):
    # Every member self-fenced in round 3 and re-registered with a new session; their round-3 join keys
    # vanished with the old leases, so every member is lost and each one sees exactly this view.
    v = view(nodes=members, plan=mk_plan(3, members), joins=[])
    action = decide(v, me(workers_round=3, workers_running=False, lease=7), PARAMS)
    assert isinstance(action, (Bump, End))


def test_running_round_without_a_visible_plan_waits():
    v = dataclasses.replace(view(), plan=None)
    assert isinstance(decide(v, me(), PARAMS), Wait)


def test_local_failure_bumps_the_round_counting_a_restart():
    failure = report(rank=3, exitcode=7)
    v = view(restarts=(1, 3))
    action = decide(v, finished_here("failed", failure), PARAMS)
    assert isinstance(action, Bump)
    assert action.round == v.round
    assert action.counted is True
    assert action.failure == failure
    assert "rank 3" in action.reason and ME in action.reason and "exit code 7" in action.reason


def test_local_failure_bumps_whether_or_not_the_other_local_workers_still_run():
    for running in (True, False):
        local = me(workers_round=3, workers_running=running, outcome="failed", failure=report())
        assert isinstance(decide(view(), local, PARAMS), Bump)


def test_local_failure_by_signal_names_the_signal():
    failure = dataclasses.replace(report(), signal="SIGSEGV", exitcode=-11)
    action = decide(view(), finished_here("failed", failure), PARAMS)
    assert isinstance(action, Bump)
    assert "SIGSEGV" in action.reason


def test_spent_budget_ends_failed_with_the_earliest_failure_as_root_cause():
    local = report(ME, time=7.0)
    earlier = report("node-b", time=5.0, rank=2)
    later = report("node-c", time=9.0, rank=4)
    v = view(nodes=[ME, "node-b", "node-c"], failures={"node-b": earlier, "node-c": later}, restarts=(3, 3))
    action = decide(v, finished_here("failed", local), PARAMS)
    assert isinstance(action, End)
    assert action.phase == FAILED
    assert action.failure == local
    assert action.result.root_cause == earlier
    assert action.result.outcome == FAILED
    assert action.result.restarts == 3
    assert "--max-restarts" in action.result.reason


def test_spent_budget_root_cause_can_be_the_local_failure():
    local = report(ME, time=4.0)
    v = view(failures={"node-b": report("node-b", time=5.0)}, restarts=(3, 3))
    action = decide(v, finished_here("failed", local), PARAMS)
    assert isinstance(action, End)
    assert action.result.root_cause == local


def test_zero_budget_ends_at_the_first_failure():
    v = view(restarts=(0, 0))
    action = decide(v, finished_here("failed", report()),
                    Params(2, 4, 0, 2.0, 60.0, 1.0))
    assert isinstance(action, End) and action.phase == FAILED


def test_without_a_restarts_key_the_budget_comes_from_params():
    v = view(restarts=None)
    local = finished_here("failed", report())
    assert isinstance(decide(v, local, Params(2, 4, 1, 2.0, 60.0, 1.0)), Bump)
    assert isinstance(decide(v, local, Params(2, 4, 0, 2.0, 60.0, 1.0)), End)


def test_member_whose_join_key_vanished_is_lost_and_bumps_counting_a_restart():
    v = view(nodes=[ME, "node-b", "node-c"], joins=[ME, "node-c"])
    action = decide(v, running_here(), PARAMS)
    assert isinstance(action, Bump)
    assert action.counted is True
    assert action.failure is None
    assert "node-b" in action.reason and "node-c" not in action.reason


def test_lost_member_is_noticed_before_this_node_starts_its_workers():
    v = view(nodes=[ME, "node-b"], joins=[ME])
    assert isinstance(decide(v, me(), PARAMS), Bump)


def test_lost_member_with_the_budget_spent_ends_failed():
    v = view(nodes=[ME, "node-b"], joins=[ME], restarts=(3, 3), failures={"node-b": report("node-b", 2.0)})
    action = decide(v, running_here(lost_since=LOSS_SEEN), PARAMS)
    assert isinstance(action, End)
    assert action.phase == FAILED
    assert "node-b" in action.result.reason
    assert action.result.root_cause == report("node-b", 2.0)


def test_a_loss_that_ends_the_job_waits_a_grace_for_this_nodes_own_signal():
    """scancel stops every node at once: the first to leave looks lost to the others before their signals arrive,
    so a loss that would end the job ends it only LOSS_END_GRACE after this agent first saw it."""
    v = view(nodes=[ME, "node-b"], joins=[ME], restarts=(3, 3))
    first = decide(v, running_here(lost_since=NOW), PARAMS)
    assert isinstance(first, Wait) and first.deadline == NOW + LOSS_END_GRACE and "node-b" in first.why
    assert isinstance(decide(v, running_here(lost_since=NOW - LOSS_END_GRACE + 0.5), PARAMS), Wait)
    assert isinstance(decide(v, running_here(lost_since=LOSS_SEEN), PARAMS), End)
    # a loss the budget covers restarts at once: no grace
    assert isinstance(decide(view(nodes=[ME, "node-b"], joins=[ME]), running_here(lost_since=NOW), PARAMS), Bump)


def test_member_with_an_exit_key_but_no_join_key_is_not_lost():
    v = view(nodes=[ME, "node-b"], joins=[ME], exits=["node-b"])
    action = decide(v, running_here(), PARAMS)
    assert isinstance(action, Wait)


def test_local_success_writes_the_exit_key():
    v = view()
    action = decide(v, finished_here("succeeded"), PARAMS)
    assert action == WriteExit(v.round, len(v.plan.members))


def test_local_success_with_the_exit_key_written_waits_for_the_others():
    v = view(exits=[ME])
    action = decide(v, finished_here("succeeded"), PARAMS)
    assert isinstance(action, Wait)


def test_every_member_exited_ends_done():
    v = view(exits=[ME, "node-b"], failures={})
    action = decide(v, finished_here("succeeded"), PARAMS)
    assert isinstance(action, End)
    assert action.phase == DONE
    assert action.result.outcome == "succeeded"
    assert action.result.root_cause is None
    assert action.result.round == 3
    assert action.failure is None


def test_failure_after_a_node_finished_ends_failed_partly_finished():
    failure = report(time=3.0)
    v = view(exits=["node-b"], restarts=(0, 3))
    action = decide(v, finished_here("failed", failure), PARAMS)
    assert isinstance(action, End)
    assert action.phase == FAILED
    assert "partly finished" in action.result.reason
    assert "node-b" in action.result.reason
    assert action.failure == failure
    assert action.result.root_cause == failure


def test_lost_node_after_another_finished_ends_failed_partly_finished():
    v = view(nodes=[ME, "node-b", "node-c"], joins=[ME, "node-c"], exits=["node-c"])
    action = decide(v, running_here(lost_since=LOSS_SEEN), PARAMS)
    assert isinstance(action, End)
    assert action.phase == FAILED
    assert "partly finished" in action.result.reason


def test_newcomer_while_the_plan_has_room_waits_to_settle_then_bumps_free():
    v = view(nodes=[ME, "node-b", "node-new"], plan=mk_plan(3, [ME, "node-b"]))
    since = NOW - 0.25
    action = decide(v, running_here(newcomers_since=since), PARAMS)
    assert isinstance(action, Wait)
    assert action.deadline == since + PARAMS.scale_settle
    assert "node-new" in action.why

    later = decide(v, running_here(now=since + PARAMS.scale_settle, newcomers_since=since), PARAMS)
    assert isinstance(later, Bump)
    assert later.counted is False
    assert later.failure is None
    assert "node-new" in later.reason


def test_newcomer_when_the_plan_is_at_max_nodes_does_not_bump():
    p = Params(1, 2, 3, 2.0, 60.0, 1.0)
    v = view(nodes=[ME, "node-b", "node-new"], plan=mk_plan(3, [ME, "node-b"]))
    action = decide(v, running_here(now=NOW + 100, newcomers_since=NOW), p)
    assert isinstance(action, Wait)
    assert action.deadline is None


def test_newcomer_after_a_node_finished_does_not_bump():
    v = view(nodes=[ME, "node-b", "node-new"], plan=mk_plan(3, [ME, "node-b"]), exits=["node-b"])
    action = decide(v, running_here(now=NOW + 100, newcomers_since=NOW), PARAMS)
    assert isinstance(action, Wait)


def test_steady_running_round_waits_without_deadline():
    action = decide(view(), running_here(), PARAMS)
    assert action == Wait(action.why, None)
    assert "running with 2 node(s)" in action.why


@pytest.mark.parametrize("phase", [JOINING, RUNNING])
def test_workers_running_for_an_older_round_are_stopped(phase):
    v = view(number=4, phase=phase, joins=[ME, "node-b"] if phase == JOINING else None,
             reason="worker rank 1 on node-b failed")
    action = decide(v, running_here(3), PARAMS)
    assert isinstance(action, StopWorkers)
    assert "round 4" in action.why


def test_local_success_but_the_round_moved_on_ends_failed():
    v = view(number=4, phase=JOINING, joins=[ME, "node-b"], reason="node(s) node-c can join (scale-up)")
    action = decide(v, finished_here("succeeded", number=3), PARAMS)
    assert isinstance(action, End)
    assert action.phase == FAILED
    assert action.round == v.round
    assert "partly finished" in action.result.reason
    assert action.result.outcome == FAILED


def test_first_round_waits_out_the_last_call_even_when_every_registered_node_joined():
    # No plan yet: more nodes may still be starting, so the fast path does not apply.
    v = view(phase=JOINING, number=1, nodes=[ME, "node-b"], joins=[jn(ME, 11), jn("node-b", 12)])
    p = Params(2, 4, 3, 30.0, 60.0, 1.0)
    action = decide(v, me(round_seen_at=NOW, min_reached_at=NOW), p)
    assert isinstance(action, Wait) and action.deadline == NOW + p.last_call
    assert isinstance(decide(v, me(round_seen_at=NOW, min_reached_at=NOW - 30.0), p), ClosePlan)


# --- partial views: what an agent that does not lead the round sees -------------------------------------------

def test_a_joiner_that_does_not_lead_waits_and_never_times_the_round_out():
    v = partial(view(phase=JOINING, joins=["node-b", ME]), "node-b")
    late = me(round_seen_at=NOW - 10 * PARAMS.join_timeout)
    action = decide(v, late, PARAMS)
    assert isinstance(action, Wait) and action.deadline is None and "node-b leads it" in action.why


def test_the_leader_closes_with_the_leader_recorded_in_the_plan():
    v = view(phase=JOINING, nodes=[ME, "node-b", "node-c", "node-d"], joins=[ME, "node-b", "node-c", "node-d"])
    action = decide(v, me(), PARAMS)
    assert isinstance(action, ClosePlan) and action.plan.leader == ME
    assert action.plan.leader_node == ME


def test_a_member_that_does_not_lead_sees_only_the_loss_of_the_peer_it_watches():
    plan = mk_plan(3, [ME, "node-b", "node-c"])
    unwatched_gone = partial(view(plan=plan, joins=[ME]), "node-c")
    assert "node-c" not in unwatched_gone.joins
    action = decide(unwatched_gone, running_here(), PARAMS)
    assert isinstance(action, Bump) and "node-c" in action.reason  # its watched peer vanished: that is a loss
    nothing_known = partial(view(plan=plan, joins=[ME, "node-c"]), "node-c")
    assert isinstance(decide(nothing_known, running_here(), PARAMS), Wait)  # node-b is not watched here: no loss


def test_only_the_leader_scales_up():
    v = view(nodes=[ME, "node-b", "node-new"], plan=mk_plan(3, [ME, "node-b"]))
    assert isinstance(decide(v, running_here(newcomers_since=NOW - 5), PARAMS), Bump)
    assert isinstance(decide(partial(v, "node-b"), running_here(newcomers_since=NOW - 5), PARAMS), Wait)


def test_the_last_node_to_exit_ends_the_job_from_the_exits_its_txn_read_back():
    v = partial(view(exits=[ME, "node-b"]), "node-b")
    action = decide(v, finished_here("succeeded"), PARAMS)
    assert isinstance(action, End) and action.phase == DONE


def test_the_ring_of_predecessors_covers_every_member():
    plan = mk_plan(3, ["a", "b", "c", "d"])
    assert [plan.predecessor(n) for n in plan.nodes] == ["d", "a", "b", "c"]
    assert mk_plan(3, ["solo"]).predecessor("solo") is None and plan.predecessor("stranger") is None
