"""A round's plan as a header and B parts (``schema/plan.py``): how it is split, found, assembled and read in part."""

from __future__ import annotations

import json
import zlib

import pytest

from etcd_agent.coord.mirror import Mirror
from etcd_agent.errors import BadKeyData
from etcd_agent.etcd.client import KV
from etcd_agent.schema import plan as plan_module
from etcd_agent.schema.keys import Keys, ParsedKey
from etcd_agent.schema.plan import MAX_PARTS, Member, Plan, PlanPart, part_of, parts_for
from etcd_agent.schema.values import RoundInfo, Phase

K = Keys("/etcd-agent", "job1", 1)


def make(n: int, nproc: int = 2, leader: str = "") -> Plan:
    members = tuple(Member(f"node-{i}", i, f"host-{i}", f"10.0.{i // 256}.{i % 256}", nproc, i * nproc)
                    for i in range(n))
    return Plan(5, members, members[0].addr, 29500, 1, 3, 0, leader or members[0].node)


def stored(plan: Plan, rev: int = 10) -> list[KV]:
    """The KVs the close txn writes for ``plan``: the header and every part."""
    return [KV(K.plan(plan.round), plan.header(), rev, rev, 1, 0)] + [
        KV(K.plan_part(plan.round, p.part), p.encode(), rev, rev, 1, 0) for p in plan.split()]


def test_the_number_of_parts_grows_with_n_up_to_what_one_txn_holds():
    assert [parts_for(n) for n in (1, 16, 17, 1000, 1920, 10_000, 100_000)] == [1, 1, 2, 63, 120, 120, 120]
    assert MAX_PARTS + 4 <= 128  # the close txn: header, parts, round, two reads; etcd's --max-txn-ops is 128


def test_a_node_finds_its_part_from_its_name_alone_and_every_process_agrees():
    assert part_of("node-7", 16) == zlib.crc32(b"node-7") % 16 == 10  # not hash(): that differs between processes
    plan = make(50)
    parts = plan.split()
    assert len(parts) == 4 and sum(len(p.entries) for p in parts) == 50
    assert all(part_of(m.node, 4) == p.part for p in parts for m, _pred in p.entries)


def test_the_header_holds_no_member_and_each_part_spells_out_what_its_members_need():
    plan = make(3, nproc=4, leader="node-1")
    header = json.loads(plan.header())
    assert header == {"v": 1, "round": 5, "world_size": 12, "group_world_size": 3, "master_addr": "10.0.0.0",
                      "master_port": 29500, "restart_count": 1, "max_restarts": 3, "leader": "node-1", "parts": 1}
    (part,) = plan.split()
    assert json.loads(part.encode())["members"] == [["node-0", 0, 4, "10.0.0.0", 0, "node-2"],
                                                    ["node-1", 1, 4, "10.0.0.1", 4, "node-0"],
                                                    ["node-2", 2, 4, "10.0.0.2", 8, "node-1"]]


def test_the_whole_plan_is_assembled_from_its_header_and_every_part():
    plan = make(300)
    kvs = stored(plan)
    header = Plan.from_kv(kvs[0])
    whole = header.with_parts(K.plan(5), [PlanPart.from_kv(kv) for kv in kvs[1:]])
    assert whole.complete and whole.members == tuple(m._replace(host="") for m in plan.members)
    assert whole.world_size == 600 and whole.group_world_size == 300 and whole.leader_node == "node-0"
    assert [whole.predecessor(n) for n in ("node-0", "node-1", "node-299")] == ["node-299", "node-0", "node-298"]
    assert whole.outside("stranger") and not whole.outside("node-7")


def test_a_plan_held_in_part_answers_what_a_member_asks():
    plan = make(70)  # in 5 parts
    kvs = stored(plan)
    me = "node-42"
    mine = part_of(me, 5)
    partial = Plan.from_kv(kvs[0]).with_parts(K.plan(5), [PlanPart.from_kv(kvs[1 + mine])])
    assert not partial.complete and 0 < len(partial.members) < 70
    m = partial.member(me)
    assert m is not None and (m.group_rank, m.rank_offset, m.nproc) == (42, 84, 2)
    assert partial.predecessor(me) == "node-41"  # from its part, though node-41 may be in another
    assert (partial.world_size, partial.group_world_size, partial.leader_node, partial.restart_count) == (
        140, 70, "node-0", 1)
    other = next(f"node-{i}" for i in range(70) if part_of(f"node-{i}", 5) != mine)
    assert partial.member(other) is None and not partial.outside(other)  # not held: not known to be no member
    stranger = next(f"x{i}" for i in range(100) if part_of(f"x{i}", 5) == mine)
    assert partial.outside(stranger)  # its part is held, and it is not in it


def test_a_header_of_the_older_format_with_every_member_is_a_whole_plan():
    old = {"v": 1, "round": 2, "world_size": 3, "group_world_size": 2, "master_addr": "a", "master_port": 1,
           "restart_count": 0, "members": [["a", 1, "10.0.0.1"], ["b", 2, "10.0.0.2"]]}
    plan = Plan.read(K.plan(2), json.dumps(old).encode())
    assert plan.complete and plan.parts == 0 and plan.nodes == ["a", "b"] and plan.world_size == 3
    assert plan.with_parts(K.plan(2), []) is plan and plan.predecessor("a") == "b" and plan.leader_node == "a"


@pytest.mark.parametrize("change, problem", [
    (lambda h: {**h, "parts": 0}, "parts must be 1-120"),
    (lambda h: {k: v for k, v in h.items() if k != "group_world_size"}, "missing field"),
])
def test_a_bad_header_is_bad_data(change, problem):
    header = json.loads(make(3).header())
    with pytest.raises(BadKeyData, match=problem):
        Plan.read(K.plan(5), json.dumps(change(header)).encode())


def test_a_member_in_the_wrong_part_or_twice_is_bad_data():
    plan = make(200)
    header, parts = Plan.read(K.plan(5), plan.header()), plan.split()
    with pytest.raises(BadKeyData, match="does not belong in part"):
        header.with_parts(K.plan(5), [PlanPart(5, 0, parts[1].entries)])
    with pytest.raises(BadKeyData, match="bad plan part"):
        PlanPart.read(K.plan_part(5, 0), b'{"v":1,"round":5,"part":0,"members":[["a",0,1]]}')
    assert header.with_parts(K.plan(5), [parts[0], parts[0]]).members == header.with_parts(
        K.plan(5), [parts[0]]).members  # a part read twice counts once


def test_part_keys_are_keys_of_the_schema():
    assert K.plan_part(3, 7) == "/etcd-agent/job1/0001/r/00000003/plan/7"
    assert K.parse(K.plan_part(3, 7)) == ParsedKey("plan_part", round=3, part=7)
    for bad in ("plan/x", "plan/07", "plan/1/2", "plan/"):
        with pytest.raises(BadKeyData):
            K.parse(K.round_dir(3) + bad)


def test_the_mirror_assembles_what_it_holds_and_keeps_the_last_plans_parts(monkeypatch):
    monkeypatch.setattr(plan_module, "PART_SIZE", 4)
    plan = make(12)
    kvs = stored(plan)
    m = Mirror(K)
    m.reset([kvs[0], kvs[2]], 10)  # the header and part 1
    partial = m.plan(5)
    assert partial.held == {1} and not partial.complete and m.plan(5) is partial  # made once per change
    m.absorb(stored(plan, 11)[1:], 11)  # the other parts arrive (a read of the whole plan, or the round's watch)
    assert m.plan(5).complete and m.plan(5).nodes == plan.nodes
    m.absorb([KV(K.round(), RoundInfo(6, Phase.JOINING, last_plan=5).encode(), 12, 12, 1, 0)], 12)
    m.prune(6, 5)
    assert m.plan(5).complete  # the last plan is kept whole: header and parts
    m.prune(7, None)
    assert m.plan(5) is None and not m.under(K.round_dir(5))
