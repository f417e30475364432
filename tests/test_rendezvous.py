"""decide(view, local, params) over hand-built views: closing rounds, stable ranks, failures, exits, scale-up."""

from __future__ import annotations

import dataclasses

import pytest

from etcd_agent.coord import blame
from etcd_agent.coord.blame import Attribute, ReportLoss
from etcd_agent.coord.decide import (LOSS_END_GRACE, Bump, CheckHealth, ClosePlan, End, Finish, JoinRound, Local,
                                     Params, StartWorkers, StopWorkers, Wait, WriteExit, decide, job_error, newcomers,
                                     passed_over, result)
from etcd_agent.coord.ranks import build_plan
from etcd_agent.errors import JobFailed, JobStopped, RendezvousTimeout, RestartBudgetSpent
from etcd_agent.coord.mirror import DONE, FAILED, JOINING, RUNNING, STOPPED, Scope, View
from etcd_agent.schema.values import (Failure, Join, Member, NodeInfo, Outcome, Plan, Restarts, Result, RoundInfo,
                                      SpecValue)

ME = "node-a"
ROUND_REV = 500
NOW = 1000.0
WALL = 1_700_000_000.0
PARAMS = Params(min_nodes=2, max_nodes=4, max_restarts=3, last_call=2.0, join_timeout=60.0, scale_settle=1.0)
LOSS_SEEN = NOW - LOSS_END_GRACE  # a loss that ends the job, first seen a grace ago: it ends now


# --- builders --------------------------------------------------------------------------------------------------

def jn(node: str, rev: int, prev_rank: int | None = None, nproc: int = 2, port: int | None = None) -> Join:
    return Join(node, rev, f"host-{node}", f"addr-{node}", port if port is not None else 29000 + rev, nproc,
                prev_rank)


def mk_plan(number: int, nodes, nproc: int = 2, restart_count: int = 0) -> Plan:
    members, offset = [], 0
    for rank, node in enumerate(nodes):
        members.append(Member(node, rank, f"host-{node}", f"addr-{node}", nproc, offset))
        offset += nproc
    return Plan(number, tuple(members), f"addr-{nodes[0]}", 29400, restart_count, PARAMS.max_restarts, ROUND_REV)


def view(number: int = 3, phase: str = RUNNING, nodes=(ME, "node-b"), joins=None, plan=None, last_plan=None,
         exits=(), failures=None, restarts=(0, 3), result=None, reason: str = "", round_present: bool = True) -> View:
    """A View of round ``number``. Running rounds default to a plan of ``nodes`` that every node has joined;
    ``joins`` takes node names (joined in the given order) or Join records."""
    if plan is None and phase == RUNNING:
        plan = mk_plan(number, list(nodes))
    if joins is None:
        joins = plan.nodes if plan is not None else ()
    records = [j if isinstance(j, Join) else jn(j, 100 + i) for i, j in enumerate(joins)]
    return View(
        revision=1000,
        spec=SpecValue(PARAMS.min_nodes, PARAMS.max_nodes, "2", PARAMS.max_restarts),
        round=RoundInfo(number, phase, reason, ROUND_REV) if round_present else None,
        nodes={n: NodeInfo(n, f"host-{n}", pid=1) for n in nodes},
        joins={j.node: j for j in records},
        plan=plan,
        last_plan=last_plan,
        exits=frozenset(exits),
        failures=dict(failures or {}),
        restarts=Restarts(restarts[0], restarts[1], 400) if restarts is not None else None,
        result=result,
    )


def me(**kwargs) -> Local:
    return Local(**(dict(node=ME, now=NOW, wall=WALL) | kwargs))


def running_here(number: int = 3, **kwargs) -> Local:
    """This node's workers run for round ``number``."""
    return me(**(dict(workers_round=number, workers_running=True) | kwargs))


def finished_here(outcome: str, failure: dict | None = None, number: int = 3, **kwargs) -> Local:
    """This node's workers of round ``number`` have an ``outcome``: after a failure the others still run (the
    agent stops them only when the round moves on); after a success all have exited."""
    return me(workers_round=number, workers_running=outcome == "failed", outcome=outcome, failure=failure, **kwargs)


def report(node: str = ME, time: float = 7.0, rank: int = 1, exitcode: int = 1) -> Failure:
    return Failure(rank, exitcode=exitcode, message="boom", time=time, node=node)


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


# --- build_plan ------------------------------------------------------------------------------------------------

def test_build_plan_keeps_previous_members_in_prev_rank_order_then_newcomers_in_join_order():
    joins = [
        jn("new-2", 15),
        jn("old-1", 10, prev_rank=2),  # joined first, but ranked after old-0
        jn("old-0", 20, prev_rank=0),
        jn("new-1", 12),
    ]
    plan = build_plan(5, joins, Params(1, 8, 3, 0.0, 60.0, 1.0), restart_count=1)
    assert plan.nodes == ["old-0", "old-1", "new-1", "new-2"]
    assert [m.group_rank for m in plan.members] == [0, 1, 2, 3]
    assert plan.round == 5 and plan.restart_count == 1


def test_build_plan_rank_offsets_are_prefix_sums_of_heterogeneous_nproc():
    joins = [jn("a", 1, nproc=8), jn("b", 2, nproc=4), jn("c", 3, nproc=2), jn("d", 4, nproc=2)]
    plan = build_plan(1, joins, Params(1, 8, 0, 0.0, 60.0, 1.0), restart_count=0)
    assert [m.rank_offset for m in plan.members] == [0, 8, 12, 14]
    assert [m.nproc for m in plan.members] == [8, 4, 2, 2]
    assert plan.world_size == 16


def test_build_plan_master_is_group_rank_zero():
    joins = [jn("newcomer", 1, port=31000), jn("veteran", 9, prev_rank=0, port=32000)]
    plan = build_plan(2, joins, Params(1, 8, 0, 0.0, 60.0, 1.0), restart_count=0)
    assert plan.members[0].node == "veteran"
    assert plan.master_addr == "addr-veteran"
    assert plan.master_port == 32000


def test_build_plan_takes_at_most_max_nodes():
    joins = [jn(f"n{i}", 10 + i) for i in range(5)]
    plan = build_plan(1, joins, Params(1, 3, 0, 0.0, 60.0, 1.0), restart_count=0)
    assert plan.nodes == ["n0", "n1", "n2"]
    assert len(plan.members) == 3


def test_build_plan_members_carry_their_join_addresses():
    plan = build_plan(1, [jn("a", 1, nproc=3)], PARAMS, restart_count=0)
    assert plan.members[0] == Member("a", 0, "host-a", "addr-a", 3, 0)


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


# --- --node-rank pins and --master-addr/--master-port (torchrun's static rendezvous) ---------------------------

def pin(node: str, rev: int, rank: int | None, **kwargs) -> Join:
    """A join record of ``node`` started with ``--node-rank rank`` (None: not pinned)."""
    return dataclasses.replace(jn(node, rev, **kwargs), node_rank=rank)


def test_pinned_nodes_get_their_rank_whatever_the_join_order():
    joins = [pin("c", 10, 2), pin("a", 11, 0), pin("b", 12, 1)]
    plan = build_plan(1, joins, Params(1, 3, 0, 0.0, 60.0, 1.0), restart_count=0)
    assert plan.nodes == ["a", "b", "c"]
    assert [m.group_rank for m in plan.members] == [0, 1, 2]


def test_unpinned_nodes_fill_the_free_ranks_in_stable_order():
    joins = [pin("new-1", 10, None), pin("pinned-0", 11, 0), pin("old", 12, None, prev_rank=3),
             pin("pinned-2", 13, 2), pin("new-2", 14, None)]
    plan = build_plan(4, joins, Params(1, 8, 3, 0.0, 60.0, 1.0), restart_count=0)
    assert plan.nodes == ["pinned-0", "old", "pinned-2", "new-1", "new-2"]


def test_a_pin_beats_the_previous_plans_order():
    joins = [pin("a", 10, 1, prev_rank=0), pin("b", 11, None, prev_rank=1)]
    plan = build_plan(2, joins, Params(1, 2, 0, 0.0, 60.0, 1.0), restart_count=0)
    assert plan.nodes == ["b", "a"]


def test_rank_offsets_are_prefix_sums_over_pinned_group_ranks():
    joins = [pin("two", 10, 2, nproc=2), pin("zero", 11, 0, nproc=4), pin("one", 12, 1, nproc=8)]
    plan = build_plan(1, joins, Params(3, 3, 0, 0.0, 60.0, 1.0), restart_count=0)
    assert [(m.node, m.rank_offset, m.nproc) for m in plan.members] == [("zero", 0, 4), ("one", 4, 8), ("two", 12, 2)]
    assert plan.world_size == 14


def test_build_plan_refuses_a_ranking_with_missing_ranks():
    with pytest.raises(ValueError, match="group rank"):
        build_plan(1, [pin("a", 10, 1)], Params(1, 2, 0, 0.0, 60.0, 1.0), restart_count=0)


@pytest.mark.parametrize("addr, port, want", [
    ("10.0.0.9", 29500, ("10.0.0.9", 29500)),  # both given: exactly torchrun's static MASTER_ADDR/PORT
    ("10.0.0.9", None, ("10.0.0.9", 31000)),  # an address only: the port rank 0 found free
    (None, 29500, ("addr-zero", 29500)),
    (None, None, ("addr-zero", 31000)),  # neither: today's master
])
def test_the_master_comes_from_group_rank_zeros_join_record(addr, port, want):
    zero = dataclasses.replace(pin("zero", 12, 0, port=31000), master_addr=addr, master_port=port)
    other = dataclasses.replace(pin("one", 11, 1, port=32000), master_addr="elsewhere", master_port=1)
    plan = build_plan(1, [other, zero], Params(2, 2, 0, 0.0, 60.0, 1.0), restart_count=0)
    assert (plan.master_addr, plan.master_port) == want


STATIC = Params(min_nodes=1, max_nodes=3, max_restarts=3, last_call=2.0, join_timeout=60.0, scale_settle=1.0)


def test_the_leader_does_not_close_while_a_pin_is_beyond_the_member_count():
    v = view(phase=JOINING, number=1, nodes=[ME, "node-b"], joins=[pin(ME, 11, None), pin("node-b", 12, 2)])
    action = decide(v, me(round_seen_at=NOW - 30, min_reached_at=NOW - 30), STATIC)  # the last call is long over
    assert isinstance(action, Wait)
    assert action.deadline == NOW - 30 + STATIC.join_timeout
    assert "group rank(s) 1 have no node yet (node-b has --node-rank 2)" in action.why


def test_the_fast_path_waits_for_missing_ranks_too():
    v = view(phase=JOINING, nodes=[ME, "node-b"], joins=[pin(ME, 11, 0), pin("node-b", 12, 2)],
             last_plan=mk_plan(2, [ME, "node-x", "node-b"]))
    assert isinstance(decide(v, me(round_seen_at=NOW, min_reached_at=NOW), STATIC), Wait)


def test_the_round_closes_once_the_missing_rank_joined():
    v = view(phase=JOINING, number=1, nodes=[ME, "node-b", "node-c"],
             joins=[pin(ME, 11, 1), pin("node-b", 12, 2), pin("node-c", 13, 0)])
    action = decide(v, me(round_seen_at=NOW, min_reached_at=NOW), STATIC)
    assert isinstance(action, ClosePlan)
    assert action.plan.nodes == ["node-c", ME, "node-b"]
    assert dict(action.join_revisions) == {ME: 11, "node-b": 12, "node-c": 13}


def test_an_unpinned_newcomer_can_fill_the_missing_rank():
    v = view(phase=JOINING, nodes=[ME, "node-b", "node-c"],
             joins=[pin(ME, 11, 2), pin("node-b", 12, None), pin("node-c", 13, None)],
             last_plan=mk_plan(2, ["node-b", "node-c", ME]))
    action = decide(v, me(round_seen_at=NOW, min_reached_at=NOW), STATIC)
    assert isinstance(action, ClosePlan)
    assert action.plan.nodes == ["node-b", "node-c", ME]


def test_a_non_leader_keeps_the_join_timeout_while_ranks_are_missing():
    v = view(phase=JOINING, nodes=[ME, "node-b"], joins=[pin("node-b", 11, 2), pin(ME, 12, None)])
    action = decide(v, me(round_seen_at=NOW - 1, min_reached_at=NOW - 1), STATIC)
    assert isinstance(action, Wait) and "node-b leads" in action.why
    assert action.deadline == NOW - 1 + STATIC.join_timeout


def test_missing_ranks_at_the_join_timeout_fail_the_job_naming_them():
    p = Params(2, 5, 3, 2.0, 60.0, 1.0)
    v = view(phase=JOINING, nodes=[ME, "node-b", "node-p", "node-gone"],
             joins=[pin(ME, 11, None), pin("node-b", 12, None), pin("node-p", 13, 4)])
    action = decide(v, me(now=NOW, round_seen_at=NOW - 60.0, min_reached_at=NOW - 50), p)
    assert isinstance(action, End) and action.phase == FAILED
    reason = action.result.reason
    assert "rendezvous timed out" in reason and "--join-timeout" in reason
    assert "group rank(s) 2-3 have no node yet (node-p has --node-rank 4)" in reason
    assert "missing: node-gone" in reason


def test_too_few_nodes_at_the_join_timeout_also_names_missing_ranks():
    p = Params(3, 3, 3, 2.0, 60.0, 1.0)
    v = view(phase=JOINING, nodes=[ME, "node-b"], joins=[pin(ME, 11, 2)])
    action = decide(v, me(now=NOW, round_seen_at=NOW - 60.0), p)
    assert isinstance(action, End)
    assert "1 of at least 3 node(s)" in action.result.reason
    assert "group rank(s) 0-1 have no node yet (node-a has --node-rank 2)" in action.result.reason


def test_two_joiners_with_one_pin_block_the_round_naming_both():
    # Unreachable while the leased rank claim works; decide must still never build a plan with a duplicate rank.
    v = view(phase=JOINING, nodes=[ME, "node-b"], joins=[pin(ME, 11, 0), pin("node-b", 12, 0)])
    action = decide(v, me(round_seen_at=NOW, min_reached_at=NOW - 30), STATIC)
    assert isinstance(action, Wait)
    assert "node-b and node-a both have --node-rank 0" in action.why


def test_max_joiners_with_pins_close_at_once():
    p = Params(2, 2, 3, 30.0, 60.0, 1.0)
    v = view(phase=JOINING, number=1, nodes=[ME, "node-b"], joins=[pin(ME, 11, 1), pin("node-b", 12, 0)])
    action = decide(v, me(round_seen_at=NOW, min_reached_at=NOW), p)
    assert isinstance(action, ClosePlan)
    assert action.plan.nodes == ["node-b", ME]
    assert action.plan.master_addr == "addr-node-b"


# --- partial views: what an agent that does not lead the round sees -------------------------------------------

def partial(v: View, *watched: str) -> View:
    """``v`` as a non-leader's mirror shows it: only this node's keys and the ``watched`` peers' join keys."""
    keep = {ME, *watched}
    return dataclasses.replace(v, joins={n: j for n, j in v.joins.items() if n in keep},
                               nodes={n: r for n, r in v.nodes.items() if n == ME},
                               scope=Scope(False, frozenset(watched)))


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
