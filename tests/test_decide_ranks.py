"""decide(view, local, params) and build_plan over hand-built views: stable ranks, --node-rank pins and
--master-addr/--master-port (torchrun's static rendezvous)."""

from __future__ import annotations

import dataclasses

import pytest

from views import ME, NOW, PARAMS, jn, me, mk_plan, view

from etcd_agent.coord.decide import ClosePlan, End, Params, Wait, decide
from etcd_agent.coord.ranks import build_plan
from etcd_agent.coord.mirror import FAILED, JOINING
from etcd_agent.schema.values import Join, Member


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
