"""The round leader's member sets, kept across views by the mirror's memo, equal a fresh computation.

The mirror updates a round's exits by the exit keys changed since its last view; ``members`` remembers what it made
of a mirror's views (``View.memo``) while the nodes, joins, exits and plan it was made of are the same objects, and
grows a round's member exits by the exits that arrived. After any sequence of puts and deletes (registry entries of
every health, joins of this and older sessions, exits, plans, rounds, reads of the whole prefix), each answer equals
the one made afresh from the same view without a memo. Pure: no etcd.
"""

from __future__ import annotations

import dataclasses
import random

from etcd_agent.coord import members
from etcd_agent.coord.mirror import Mirror
from etcd_agent.etcd.client import KV
from etcd_agent.etcd.watch import Event
from etcd_agent.schema.keys import Keys, encode
from etcd_agent.schema.plan import Member, Plan

K = Keys("/etcd-agent", "job1", 1)
NODES = [f"node-{i}" for i in range(12)]


class Feed:
    """Random changes at increasing revisions."""

    def __init__(self, seed: int):
        self.rng, self.rev, self.rnd = random.Random(seed), 1, 1

    def kv(self, key: str, value: bytes, lease: int = 1) -> KV:
        self.rev += 1
        return KV(key, value, self.rev, self.rev, 1, lease)

    def plan(self) -> list[KV]:
        chosen = sorted(self.rng.sample(NODES, self.rng.randint(1, len(NODES))))
        plan = Plan(self.rnd, tuple(Member(n, i, "", "10.0.0.1", 1, i) for i, n in enumerate(chosen)),
                    "10.0.0.1", 29500, 0, 3, 0, chosen[0])
        parts = plan.split()
        held = parts if self.rng.random() < 0.8 else parts[:1]  # sometimes a plan held in part
        return [self.kv(K.plan(self.rnd), plan.header(), 0)] + [self.kv(K.plan_part(self.rnd, p.part), p.encode(), 0)
                                                                 for p in held]

    def change(self) -> list[Event]:
        rng, node = self.rng, self.rng.choice(NODES)
        what = rng.randrange(9)
        if what == 0:
            info = {"node": node, "health": rng.choice(["", "", "bad gpu"]), "spare": rng.random() < 0.2,
                    "checking": rng.random() < 0.2}
            return [Event("put", self.kv(K.node(node), encode(info), rng.choice([0, 1, 1, 1])))]
        if what == 1:
            return [Event("delete", self.kv(K.node(node), b""))]
        if what in (2, 3):
            join = {"node": node, "addr": "10.0.0.1", "port": 1, "nproc": 1}
            return [Event("put", self.kv(K.join(self.rnd, node), encode(join), rng.choice([1, 1, 1, 2])))]
        if what == 4:
            return [Event("delete", self.kv(K.join(self.rnd, node), b""))]
        if what == 5:
            return [Event("put", self.kv(K.exit(self.rnd, rng.choice(NODES + ["stranger"])), b"{}"))]
        if what == 6:
            return [Event("delete", self.kv(K.exit(self.rnd, node), b""))]
        if what == 7:
            return [Event("put", kv) for kv in self.plan()]
        if rng.random() < 0.3:
            self.rnd += 1
        state = {"round": self.rnd, "phase": rng.choice(["joining", "running", "running"])}
        if rng.random() < 0.5:
            state["scaled_for"] = rng.randint(1, self.rev)
        return [Event("put", self.kv(K.round(), encode(state), 0))]


def answers(v, node: str, lease: int) -> tuple:
    return (members.healthy(v), members.newcomers(v), members.passed_over(v), members.member_exits(v),
            members.lost_members(v, node, lease))


def test_the_memos_answers_equal_a_fresh_computation_after_random_changes():
    checked = 0
    for seed in range(40):
        feed, m = Feed(seed), Mirror(K)
        m.reset([], 1)
        for _ in range(120):
            m.apply(feed.change())
            if feed.rng.random() < 0.02:  # a read of the whole prefix replaces what was made
                m.reset(list(m.kvs.values()), feed.rev)
            v = m.view()
            where = K.exits(v.round.number) if v.round else None
            assert v.exits == (frozenset(kv.key[len(where):] for kv in m.children(where)) if where else frozenset())
            if feed.rng.random() < 0.3:
                continue  # some views are never asked: the memo must not depend on seeing every one
            node, lease = feed.rng.choice(NODES), feed.rng.choice([1, 2])
            fresh = dataclasses.replace(v, memo=None)
            assert v.memo is not None and fresh.memo is None
            assert answers(v, node, lease) == answers(fresh, node, lease)
            assert answers(v, node, lease) == answers(fresh, node, lease)  # asked again: the memo's answers
            checked += 1
    assert checked > 2000


def test_member_exits_grow_by_the_exits_that_arrived_and_shrink_on_a_delete():
    rnd = KV(K.round(), encode({"round": 1, "phase": "running"}), 2, 2, 1, 0)
    plan = Plan(1, tuple(Member(n, i, "", "10.0.0.1", 1, i) for i, n in enumerate(NODES[:3])),
                "10.0.0.1", 29500, 0, 3, 0, NODES[0])
    m = Mirror(K)
    m.reset([rnd, KV(K.plan(1), plan.header(), 3, 3, 1, 0)]
            + [KV(K.plan_part(1, p.part), p.encode(), 3, 3, 1, 0) for p in plan.split()], 3)
    assert members.member_exits(m.view()) == frozenset()
    m.apply([Event("put", KV(K.exit(1, NODES[0]), b"{}", 4, 4, 1, 1)),
             Event("put", KV(K.exit(1, "stranger"), b"{}", 4, 4, 1, 1))])
    assert members.member_exits(m.view()) == {NODES[0]}
    m.apply([Event("put", KV(K.exit(1, NODES[1]), b"{}", 5, 5, 1, 1))])
    assert members.member_exits(m.view()) == {NODES[0], NODES[1]}
    m.apply([Event("delete", KV(K.exit(1, NODES[0]), b"", 6, 6, 1, 1))])
    assert members.member_exits(m.view()) == {NODES[1]}
