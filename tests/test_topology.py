"""Topology-aware ranks (``--topology``): the path and its sources, the records that carry it, and the order the
leader gives the plan (``coord/ranks.py``): blocks get consecutive ranks, ranks stay stable across rounds, a lost
rank goes to a filler in the lost node's block. Pure, no etcd (the whole job is in test_topology_job.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from etcd_agent.cli import flags, launch, topology_flags
from etcd_agent.coord.decide import ClosePlan, Params, decide
from etcd_agent.coord.mirror import JOINING
from etcd_agent.coord.ranks import rank_joiners
from etcd_agent.errors import BadKeyData, ConfigError
from etcd_agent.schema import topology
from etcd_agent.schema.plan import Member, Plan, PlanPart
from etcd_agent.schema.values import NodeInfo
from views import NOW, jn, me, view

PATHS = {"a0": "/s1/l1", "b0": "/s1/l2", "a1": "/s1/l1", "b1": "/s1/l2", "c0": "/s2/l3", "c1": "/s2/l3"}


def ranked(joins, max_nodes=8, fill_to=0, paths=PATHS, lost=None):
    where = paths.get if paths is not None else None
    got = rank_joiners(joins, max_nodes, fill_to, where and (lambda n: where(n) or ""), lost)
    return [j.node for j in got.members]


def spare(j):
    return dataclasses.replace(j, spare=True)


# --- the path ---------------------------------------------------------------------------------------------------

def test_a_path_is_its_blocks_outermost_first_and_the_root_is_none():
    assert topology.parse("/spine2/leaf5") == ("spine2", "leaf5")
    assert topology.parse("/") == topology.parse("") == ()
    assert topology.normal("/") == "" and topology.normal("/a/b") == "/a/b"
    assert topology.shared(("s1", "l1"), ("s1", "l2")) == 1 and topology.shared(("s1",), ("s2",)) == 0
    # numbers compare by value, and two components never tie: each block stays in one piece
    assert sorted(["/s/leaf10", "/s/leaf2", "/s/leaf02"], key=lambda p: topology.sort_key(topology.parse(p))) == \
        ["/s/leaf02", "/s/leaf2", "/s/leaf10"]


@pytest.mark.parametrize("text, says", [
    ("spine2/leaf5", "must start with '/'"),
    ("/spine2//leaf5", "component 2 is empty"),
    ("/spine2/leaf5/", "component 3 is empty"),
    ("/spine 2/leaf5", "has a space"),
    ("/" + "/".join("abcdefghi"), "9 components; at most 8"),
    ("/" + "x" * 64, "65 characters long; at most 64"),
    ("/spine2/leaf*5", "only letters, digits"),
])
def test_a_bad_path_is_refused_saying_why(text, says):
    with pytest.raises(ValueError, match=says):
        topology.parse(text)


def test_slurms_topology_address_gives_the_switches_above_the_node():
    assert topology.from_slurm("root_switch.CELL1.isw1.belenos386", "switch.switch.switch.node") == \
        "/root_switch/CELL1/isw1"
    assert topology.from_slurm("tc1", "node") == "/"  # no topology plugin: the node alone
    assert topology.from_slurm("s0.s3.node12") == "/s0/s3"  # no pattern: the last component is the node


# --- the flags ------------------------------------------------------------------------------------------------

def ns(topology=None, topology_file=None):
    return argparse.Namespace(topology=topology, topology_file=topology_file)


def test_the_sources_in_order_flag_file_then_slurm(tmp_path):
    slurm = {"SLURM_TOPOLOGY_ADDR": "sp1.lf4.n7", "SLURM_TOPOLOGY_ADDR_PATTERN": "switch.switch.node"}
    label = tmp_path / "topology"
    label.write_text("/row3/rack12\nignored\n")
    assert topology_flags.resolve(ns("/a/b"), slurm) == "/a/b"
    assert topology_flags.resolve(ns("/"), slurm) == ""  # none, and Slurm's ignored
    assert topology_flags.resolve(ns(topology_file=str(label)), slurm) == "/row3/rack12"
    assert topology_flags.resolve(ns(), slurm) == "/sp1/lf4"
    assert topology_flags.resolve(ns(), {}) == ""


def test_a_bad_source_is_one_error_naming_it(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = [(ns("/a//b"), "--topology '/a//b' component 2 is empty"),
             (ns(""), "--topology is empty"),
             (ns("/a", str(empty)), "give one of them"),
             (ns(topology_file=str(empty)), "first line is empty"),
             (ns(topology_file=str(tmp_path / "missing")), "cannot read it"),
             (ns(), "SLURM_TOPOLOGY_ADDR 'a b.n1'")]
    for given, says in cases:
        with pytest.raises(ConfigError, match=says):
            topology_flags.resolve(given, {"SLURM_TOPOLOGY_ADDR": "a b.n1"})


def test_the_launch_line_takes_the_flag_into_the_agents_config(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    parser = flags.build_parser()
    line = ["--topology", "/spine2/leaf5", str(script)]
    assert launch.resolve(parser, parser.parse_args(line)).cfg.topology == "/spine2/leaf5"
    with pytest.raises(ConfigError, match="--topology '/spine 2' component 1"):
        launch.resolve(parser, parser.parse_args(["--topology", "/spine 2", str(script)]))


# --- the records ----------------------------------------------------------------------------------------------

def test_the_registry_entry_carries_the_path_and_an_entry_without_one_is_as_before():
    assert "topology" not in json.loads(NodeInfo("n1").encode())
    assert NodeInfo.read("k", NodeInfo("n1", topology="/s1/l1").encode()).topology == "/s1/l1"
    with pytest.raises(BadKeyData, match="topology '/s1//l1' component 2 is empty"):
        NodeInfo.read("k", json.dumps({"v": 1, "node": "n1", "topology": "/s1//l1"}).encode())


def test_a_plan_entry_has_the_path_as_a_seventh_item_only_when_the_member_has_one():
    part = PlanPart(2, 0, ((Member("a", 0, "", "10.0.0.1", 8, 0, "/s1/l1"), "b"),
                           (Member("b", 1, "", "10.0.0.2", 8, 8), "a")))
    raw = json.loads(part.encode())["members"]
    assert raw == [["a", 0, 8, "10.0.0.1", 0, "b", "/s1/l1"], ["b", 1, 8, "10.0.0.2", 8, "a"]]
    assert PlanPart.read("k", part.encode()) == part
    raw[0][6] = "s1/l1"
    with pytest.raises(BadKeyData, match="members\\[0\\] topology 's1/l1' must start with '/'"):
        PlanPart.read("k", json.dumps({"v": 1, "round": 2, "part": 0, "members": raw}).encode())


def test_a_plan_of_ten_thousand_members_with_the_longest_paths_fits_one_etcd_request():
    """A path costs each plan entry at most MAX_CHARS + 3 bytes: with 14-character node names, 10,000 members whose
    paths are all of the longest still fit one txn."""
    path = "/" + "/".join(["x" * 7] * 8)
    assert len(path) == topology.MAX_CHARS
    members = tuple(Member(f"gpu-node-{i:05d}", i, "", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 8, 8 * i, path)
                    for i in range(10_000))
    plan = Plan(1, members, members[0].addr, 29500, 0, 3)
    size = len(plan.header()) + sum(len(p.encode()) for p in plan.split())
    assert size < 1.5 * 2**20 - 64 * 1024, size  # etcd's --max-request-bytes, with room for the rest of the txn


# --- the order ------------------------------------------------------------------------------------------------

def test_the_first_plan_puts_each_block_together_whatever_the_join_order():
    joins = [jn("a0", 1), jn("b0", 2), jn("c0", 3), jn("a1", 4), jn("b1", 5), jn("c1", 6)]
    assert ranked(joins) == ["a0", "a1", "b0", "b1", "c0", "c1"]
    assert ranked(joins, paths=None) == ["a0", "b0", "c0", "a1", "b1", "c1"]  # without paths: join order, as before


def test_nodes_without_a_path_are_one_block_at_the_root_and_a_job_without_any_ranks_as_before():
    joins = [jn("b0", 1), jn("x", 2), jn("a0", 3), jn("y", 4), jn("b1", 5)]
    assert ranked(joins) == ["x", "y", "a0", "b0", "b1"]
    assert ranked(joins, paths={}) == ranked(joins, paths=None) == ["b0", "x", "a0", "y", "b1"]


def test_ranks_stay_the_same_while_the_membership_does():
    first = ranked([jn("a0", 1), jn("b0", 2), jn("a1", 3), jn("b1", 4)])
    again = [jn(n, 10 + i, prev_rank=first.index(n)) for i, n in enumerate(reversed(first))]  # rejoined any order
    assert ranked(again) == first
    # a plan whose order no longer follows the paths (a spare from another block took a hole) is kept as it is
    odd = ["c0", "a0", "b0"]
    assert ranked([jn(n, 20 + i, prev_rank=odd.index(n)) for i, n in enumerate(odd)]) == odd


def test_survivors_close_up_and_a_newcomer_goes_into_its_block():
    prev = ["a0", "a1", "b0", "b1"]
    survivors = [jn(n, 10 + i, prev_rank=prev.index(n)) for i, n in enumerate(prev) if n != "a1"]
    assert ranked(survivors) == ["a0", "b0", "b1"]
    assert ranked(survivors + [jn("c0", 30), jn("a1", 31)]) == ["a0", "a1", "b0", "b1", "c0"]
    # a newcomer that shares only the spine goes after the spine's last member; one that shares nothing goes last
    assert ranked([jn(n, 10 + i, prev_rank=i) for i, n in enumerate(["a0", "c0"])] + [jn("b0", 30)],
                  paths={**PATHS, "z": "/s9/l9"}) == ["a0", "b0", "c0"]


def test_a_lost_rank_goes_to_the_spare_in_the_lost_nodes_block():
    prev = ["a0", "a1", "b0", "b1"]
    lost = {r: PATHS[n] for r, n in enumerate(prev)}.get
    survivors = [jn(n, 10 + i, prev_rank=prev.index(n)) for i, n in enumerate(prev) if n != "b0"]
    spares = [spare(jn("sa", 5)), spare(jn("sb", 6))]  # the spare in the other block joined first
    paths = {**PATHS, "sa": "/s1/l1", "sb": "/s1/l2"}
    got = ranked(survivors + spares, 4, 4, paths, lambda r: lost(r) or "")
    assert got == ["a0", "a1", "sb", "b1"]
    # no spare in its leaf: the one under its spine before one elsewhere; no path known: the first spare, as before
    far = {**paths, "sb": "/s2/l3", "sc": "/s1/l9"}
    assert ranked(survivors + [spare(jn("sb", 6)), spare(jn("sc", 7))], 4, 4, far, lambda r: lost(r) or "") == \
        ["a0", "a1", "sc", "b1"]
    assert ranked(survivors + spares, 4, 4, paths, None) == ["a0", "a1", "sa", "b1"]
    # two lost ranks, two spares: each to its own block, whichever hole comes first
    two = [jn("a0", 10, prev_rank=0), jn("b1", 11, prev_rank=3)]
    assert ranked(two + spares, 4, 4, paths, lambda r: lost(r) or "") == ["a0", "sa", "sb", "b1"]


def test_the_leader_ranks_from_the_registry_and_the_last_plans_entries():
    """decide(): each joiner's path from its registry entry; the lost node's (its entry went with its lease) from
    the last plan; the new plan's entries carry the paths."""
    p = Params(4, 4, 3, 30.0, 60.0, 1.0)
    prev = ["node-a", "b0", "a1", "b1"]
    paths = {"node-a": "/s1/l1", "b0": "/s1/l2", "a1": "/s1/l1", "b1": "/s1/l2", "sa": "/s1/l1", "sb": "/s1/l2"}
    members = tuple(Member(n, i, "", f"addr-{n}", 2, 2 * i, paths[n]) for i, n in enumerate(prev))
    last = Plan(2, members, "addr-node-a", 29400, 0, 3)
    joins = [jn("node-a", 11, prev_rank=0), jn("a1", 12, prev_rank=2), jn("b1", 13, prev_rank=3),
             spare(jn("sa", 14)), spare(jn("sb", 15))]
    v = view(phase=JOINING, nodes=[j.node for j in joins], last_plan=last, joins=joins)
    v = dataclasses.replace(v, nodes={n: dataclasses.replace(i, topology=paths[n], spare=n[0] == "s")
                                      for n, i in v.nodes.items()})
    action = decide(v, me(round_seen_at=NOW, min_reached_at=NOW), p)
    assert isinstance(action, ClosePlan) and action.plan.nodes == ["node-a", "sb", "a1", "b1"]
    assert [m.topology for m in action.plan.members] == ["/s1/l1", "/s1/l2", "/s1/l1", "/s1/l2"]
