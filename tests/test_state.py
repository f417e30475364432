"""The mirror of a job's keys: replays, bad values and keys the schema does not name."""

from __future__ import annotations

import pytest

from etcd_agent.errors import BadKeyData
from etcd_agent.etcd.client import KV
from etcd_agent.schema.keys import Keys, encode
from etcd_agent.coord.mirror import Mirror
from etcd_agent.etcd.watch import Event

K = Keys("/etcd-agent", "job1", 1)


def kv(key: str, value: bytes, rev: int, lease: int = 0) -> KV:
    return KV(key, value, rev, rev, 1, lease)


def mirror(*kvs: KV, revision: int = 100) -> Mirror:
    m = Mirror(K)
    m.reset(kvs, revision)
    return m


def test_replayed_events_are_ignored_and_one_revision_applies_whole():
    m = mirror(kv(K.round(), encode({"round": 1, "phase": "joining"}), 5), revision=10)
    stale = Event("put", kv(K.round(), encode({"round": 9, "phase": "joining"}), 8))
    assert not m.apply([stale])
    plan = encode({"round": 1, "members": [["a", 1, "a"]], "master_addr": "a", "master_port": 1, "restart_count": 0})
    batch = [Event("put", kv(K.plan(1), plan, 11)),
             Event("put", kv(K.round(), encode({"round": 1, "phase": "running"}), 11))]
    assert m.apply(batch)
    assert m.round().phase == "running" and m.plan(1) is not None and m.revision == 11


@pytest.mark.parametrize("value", [b'{"v":1,"used":"x","max":3}', b'{"v":1,"used":null,"max":3}',
                                   b'{"v":1,"used":-1,"max":3}'])
def test_a_bad_restart_budget_names_its_key(value):
    with pytest.raises(BadKeyData, match=K.restarts()):
        mirror(kv(K.restarts(), value, 3)).restarts()


def test_keys_the_schema_does_not_name_are_ignored():
    plan = encode({"round": 2, "members": [["a", 1, "a"]], "master_addr": "a", "master_port": 1, "restart_count": 0})
    m = mirror(kv(K.prefix + "r/xyz/plan", b"junk", 3), kv(K.plan(2), plan, 4), kv(K.prefix + "other", b"x", 5))
    assert m.last_plan(3).round == 2


def test_join_records_carry_their_lease():
    join = encode({"node": "n", "addr": "a", "port": 1, "nproc": 2})
    m = mirror(kv(K.round(), encode({"round": 1, "phase": "joining"}), 3), kv(K.join(1, "n"), join, 4, lease=77))
    assert m.view().joins["n"].lease == 77


def joins_of(record: dict) -> dict:
    m = mirror(kv(K.round(), encode({"round": 1, "phase": "joining"}), 3), kv(K.join(1, "n"), encode(record), 4))
    return m.view().joins


def test_join_records_carry_the_static_rendezvous_flags():
    join = joins_of({"node": "n", "addr": "a", "port": 1, "nproc": 2, "node_rank": 3, "master_addr": "head",
                     "master_port": 29500})["n"]
    assert (join.node_rank, join.master_addr, join.master_port) == (3, "head", 29500)


@pytest.mark.parametrize("extra", [{}, {"node_rank": None, "master_addr": None, "master_port": None}])
def test_join_records_without_the_static_flags_still_parse(extra):
    join = joins_of({"node": "n", "addr": "a", "port": 1, "nproc": 2, "prev_rank": None} | extra)["n"]
    assert (join.node_rank, join.master_addr, join.master_port) == (None, None, None)


@pytest.mark.parametrize("extra", [{"node_rank": -1}, {"node_rank": "x"}, {"master_port": 0}, {"master_port": 70000},
                                   {"master_port": [1]}])
def test_bad_static_flags_in_a_join_record_name_the_key(extra):
    with pytest.raises(BadKeyData, match=K.join(1, "n")):
        joins_of({"node": "n", "addr": "a", "port": 1, "nproc": 2} | extra)


def test_a_view_decodes_only_what_changed_and_never_serves_a_stale_value(monkeypatch):
    import json

    from etcd_agent.schema import keys as keys_mod

    nodes = [kv(K.node(f"n{i}"), encode({"host": f"h{i}"}), 10 + i, lease=7) for i in range(5)]
    m = mirror(kv(K.round(), encode({"round": 1, "phase": "joining"}), 3), *nodes, revision=20)
    assert m.view().nodes["n4"].host == "h4"
    calls = []
    real = json.loads
    monkeypatch.setattr(keys_mod.json, "loads", lambda raw: calls.append(raw) or real(raw))
    m.view()
    assert calls == []  # nothing changed: nothing decoded again
    m.apply([Event("put", kv(K.node("n4"), encode({"host": "moved"}), 21, lease=7))])
    assert m.view().nodes["n4"].host == "moved" and len(calls) == 1
    m.apply([Event("delete", kv(K.node("n3"), b"", 22))])
    assert "n3" not in m.view().nodes
    m.apply([Event("put", kv(K.node("n2"), b"not json", 23, lease=7))])
    for _ in range(2):  # a bad value is reported on every view until it is fixed
        with pytest.raises(BadKeyData, match=K.node("n2")):
            m.view()


def test_a_plan_of_the_older_format_with_every_member_in_its_header_is_read_whole():
    from etcd_agent.schema.values import Member, Plan

    members = (Member("a", 0, "", "10.0.0.1", 4, 0), Member("b", 1, "", "10.0.0.2", 2, 4))
    plan = Plan(7, members, "10.0.0.1", 29500, 2, 3, 0, "b")
    stored = {"round": 7, "world_size": 6, "group_world_size": 2, "master_addr": "10.0.0.1", "master_port": 29500,
              "restart_count": 2, "max_restarts": 3, "leader": "b",
              "members": [["a", 4, "10.0.0.1"], ["b", 2, "10.0.0.2"]]}
    again = Plan.from_json("k", stored, 9)
    assert again.members == members and again.leader == "b" and again.world_size == 6 and again.mod_revision == 9
    assert plan.expanded()["members"][1] == {"node": "b", "group_rank": 1, "host": "", "addr": "10.0.0.2",
                                             "nproc": 2, "rank_offset": 4}
    assert Plan.from_json("k", plan.expanded(), 9).members == members  # the spelled-out form reads the same
    with pytest.raises(BadKeyData, match="group-rank order"):
        Plan.from_json("k", {**plan.expanded(), "members": list(reversed(plan.expanded()["members"]))}, 9)
    with pytest.raises(BadKeyData, match="bad plan"):
        Plan.from_json("k", {**stored, "members": [["a", 4]]}, 9)


def test_news_older_than_what_the_mirror_holds_is_ignored_key_by_key():
    m = Mirror(K)
    join = encode({"node": "n", "addr": "a", "port": 1, "nproc": 1})
    m.absorb([kv(K.join(1, "n"), join, 20)], 20)  # a txn's own read-back
    assert not m.apply([Event("put", kv(K.join(1, "n"), join, 20))])  # the watch delivers the same write later
    assert m.apply([Event("delete", kv(K.join(1, "n"), b"", 25))])
    assert not m.apply([Event("put", kv(K.join(1, "n"), join, 20))])  # a replay from before the delete
    assert m.get(K.join(1, "n")) is None
    assert m.apply([Event("put", kv(K.join(1, "n"), join, 30))])  # created again after it


def test_a_range_read_replaces_the_range_and_fences_older_news():
    m = Mirror(K)
    start, end = K.control()
    m.absorb([kv(K.restarts(), encode({"used": 0, "max": 1}), 5), kv(K.join(1, "n"), b"{}", 6)], 6)
    m.reset_range(start, end, [kv(K.round(), encode({"round": 2, "phase": "joining"}), 9)], 10)
    assert m.get(K.restarts()) is None and m.round().number == 2  # gone from the range as read
    assert m.get(K.join(1, "n")) is not None  # outside the range: untouched
    assert not m.apply([Event("put", kv(K.restarts(), encode({"used": 0, "max": 1}), 8))])  # older than the read
    m.drop_range(start, end)
    assert m.get(K.round()) is None


def test_a_registry_entry_without_a_lease_is_no_live_node():
    m = mirror(kv(K.node("alive"), encode({"host": "h"}), 10, lease=7), kv(K.node("ghost"), encode({"host": "g"}), 11))
    assert set(m.view().nodes) == {"alive"}


def test_a_views_joins_follow_every_change_in_the_mirrors_order_and_are_reused_while_nothing_changed():
    join = lambda node: encode({"node": node, "addr": "a", "port": 1, "nproc": 1})  # noqa: E731
    m = mirror(kv(K.round(), encode({"round": 1, "phase": "joining"}), 3),
               *(kv(K.join(1, f"n{i}"), join(f"n{i}"), 10 + i, lease=7) for i in range(4)), revision=20)
    first = m.view().joins
    assert list(first) == ["n0", "n1", "n2", "n3"]
    assert m.view().joins is first  # nothing changed: the leader's view of N joins is not made again
    m.apply([Event("delete", kv(K.join(1, "n1"), b"", 21)), Event("put", kv(K.join(1, "n4"), join("n4"), 22))])
    m.apply([Event("put", kv(K.join(1, "n1"), join("n1"), 23, lease=8))])
    joins = m.view().joins
    assert list(joins) == ["n0", "n2", "n3", "n4", "n1"] and joins["n1"].lease == 8
    assert list(first) == ["n0", "n1", "n2", "n3"]  # a view's dict never changes under it
    m.prune(2, None)
    assert m.view().joins == {}
