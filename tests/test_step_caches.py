"""What an agent's step keeps between steps, and what it skips: a change is always seen.

The mirror remakes a plan and a round's exits only when a key under them changed (directory stamps), finds the
last plan among the plan headers it holds, ``Roles._role`` does nothing when its role and watches are as it left
them, and the agent's wait goes on after a wake by watch news that changed nothing (``Roles.news``). Pure: no etcd.
"""

from __future__ import annotations

import queue
import threading
import types

from etcd_agent import agent as agent_module
from etcd_agent.agent import Agent, Leave
from etcd_agent.coord.decide import Wait
from etcd_agent.coord.mirror import Mirror
from etcd_agent.coord.roles import Roles
from etcd_agent.coord.waiting import Note, Said
from etcd_agent.coord.watches import WatchDelivery
from etcd_agent.etcd.client import KV
from etcd_agent.etcd.watch import Event
from etcd_agent.schema.keys import Keys, encode
from etcd_agent.schema.plan import Member, Plan

K = Keys("/etcd-agent", "job1", 1)


def kv(key: str, value: bytes, rev: int) -> KV:
    return KV(key, value, rev, rev, 1, 0)


def plan_kvs(rnd: int, n: int, rev: int) -> list[KV]:
    members = tuple(Member(f"node-{i}", i, "", f"10.0.0.{i}", 1, i) for i in range(n))
    plan = Plan(rnd, members, "10.0.0.0", 29500, 0, 3, 0, "node-0")
    return [kv(K.plan(rnd), plan.header(), rev)] + [kv(K.plan_part(rnd, p.part), p.encode(), rev)
                                                    for p in plan.split()]


def test_a_plan_is_made_again_exactly_when_its_header_or_one_of_its_parts_changes():
    header, *parts = plan_kvs(5, 50, 10)
    assert len(parts) == 4
    m = Mirror(K)
    m.reset([header, parts[0]], 10)
    first = m.plan(5)
    assert first.held == {0} and m.plan(5) is first  # nothing changed: the same plan
    m.apply([Event("put", kv(K.join(5, "x"), b"{}", 11))])
    assert m.plan(5) is first  # a key elsewhere changed
    m.apply([Event("put", kv(parts[1].key, parts[1].value, 12))])
    assert m.plan(5).held == {0, 1}
    m.apply([Event("delete", kv(parts[1].key, b"", 13))])
    again = m.plan(5)
    assert again.held == {0} and again is not first and again.members == first.members
    m.apply([Event("put", kv(parts[0].key, parts[0].value, 14))])  # the same part written again: made again
    assert m.plan(5) is not again and m.plan(5).held == {0}
    m.apply([Event("delete", kv(header.key, b"", 15))])
    assert m.plan(5) is None
    m.reset([header, *parts], 20)  # a read of everything replaces what was made
    assert m.plan(5).complete


def test_the_last_plan_follows_every_plan_header_put_deleted_or_read():
    m = Mirror(K)
    m.reset([*plan_kvs(2, 3, 5), *plan_kvs(4, 3, 6), kv(K.join(4, "node-0"), b"{}", 6)], 10)
    assert m.last_plan(5).round == 4 and m.last_plan(4).round == 2 and m.last_plan(2) is None
    m.apply([Event("delete", kv(K.plan(4), b"", 11))])
    assert m.last_plan(5).round == 2
    m.apply([Event("put", plan_kvs(3, 3, 12)[0])])
    assert m.last_plan(5).round == 3
    m.prune(4, None)  # the rounds before 4 are forgotten
    assert m.last_plan(5) is None
    m.reset(plan_kvs(1, 3, 20), 20)
    assert m.last_plan(5).round == 1


def test_a_views_exits_follow_every_change_and_are_kept_while_none_comes():
    rnd = kv(K.round(), encode({"round": 3, "phase": "running"}), 5)
    m = Mirror(K)
    m.reset([rnd, kv(K.exit(3, "a"), b"{}", 6)], 10)
    first = m.view().exits
    assert first == {"a"}
    m.apply([Event("put", kv(K.join(3, "b"), encode({"node": "b", "addr": "x", "port": 1, "nproc": 1}), 11))])
    assert m.view().exits is first  # the view was made again, its exits were not
    m.apply([Event("put", kv(K.exit(3, "b"), b"{}", 12))])
    assert m.view().exits == {"a", "b"}
    m.apply([Event("delete", kv(K.exit(3, "a"), b"", 13))])
    assert m.view().exits == {"b"}
    m.reset([rnd], 20)
    assert m.view().exits == frozenset()


class FakeWatches:
    """The watches ``Roles._role`` places, and every call it makes."""

    def __init__(self):
        self.ranges: dict[str, tuple[str, bytes]] = {}
        self.known: dict[str, int] = {}
        self.calls: list[tuple] = []

    def ensure(self, name, start, end, snapshot=None):
        self.calls.append(("ensure", name))
        self.ranges[name] = (start, end)

    def follow(self, name, key, since):
        self.calls.append(("follow", name))
        self.ranges[name] = (key, b"")

    def unwatch(self, name, drop=True):
        self.calls.append(("unwatch", name))
        self.ranges.pop(name, None)
        self.known.pop(name, None)

    def watched(self, name):
        return self.ranges.get(name)


def roles() -> Roles:
    return Roles(None, K, "node-1", Mirror(K), FakeWatches(), None)


def test_a_role_placed_again_unchanged_does_nothing_but_any_change_places_it_again():
    r = roles()
    peer = K.join(1, "node-0")
    r._role(False, peer=peer)
    assert ("ensure", "peer") in r.watches.calls and r.scope.watched == frozenset()
    r.watches.calls.clear()
    r._role(False, peer=peer)
    assert r.watches.calls == []  # the same role, the same watches: nothing to do
    r.watches.known["peer"] = 7  # the peer's key was read: the scope says so
    r._role(False, peer=peer)
    assert r.scope.watched == {"node-0"}
    r.watches.calls.clear()
    r.watches.unwatch("peer")  # a watch changed under it
    r._role(False, peer=peer)
    assert ("ensure", "peer") in r.watches.calls and r.watches.watched("peer") == (peer, b"")
    r._role(True, 1)  # another role
    assert r.scope.full and r.watches.watched("peer") is None and r.watches.watched("round") is not None


def test_news_is_equal_only_while_nothing_a_decision_reads_changed_and_maintain_has_nothing_left():
    r = roles()
    assert r.news() != r.news()  # maintain never ran: the next step runs
    r._settled = ()
    before = r.news()
    assert r.news() == before
    r.mirror.apply([Event("put", kv(K.round(), encode({"round": 1, "phase": "joining"}), 3))])
    assert r.news() != before
    before = r.news()
    r.watches.known["peer"] = 4
    assert r.news() != before


def waiting_agent(monkeypatch, news):
    """An agent as far as ``_wait`` goes: its queue, its handlers (each event is a callable run when handled)."""
    monkeypatch.setattr(agent_module, "wait_note", lambda *a: Note("", Said(), None))
    a = types.SimpleNamespace(events=queue.SimpleQueue(), local=None, params=None, state=None, _wait_said=Said(),
                              log=types.SimpleNamespace(debug=lambda *a: None, info=lambda *a: None),
                              workers=types.SimpleNamespace(refill=lambda: None),
                              coord=types.SimpleNamespace(roles=types.SimpleNamespace(news=news)))
    a._drain = lambda block, deadline=None: Agent._drain(a, block, deadline)
    a._handle = lambda event: Agent._handle(a, event)
    a.on_event = {WatchDelivery: lambda e: e.delivery(), Leave: lambda e: None}
    return a


def test_a_wake_by_watch_news_that_changed_nothing_waits_on_and_a_change_ends_the_wait(monkeypatch):
    state = {"changes": 0, "calls": 0}
    asked_again = threading.Event()

    def news():
        state["calls"] += 1
        if state["calls"] == 2:  # after the first wake: the wait goes on from here
            asked_again.set()
        return state["changes"]

    a = waiting_agent(monkeypatch, news)
    handled = []
    a.events.put(WatchDelivery("peer", 1, lambda: handled.append("old news")))
    waiter = threading.Thread(target=Agent._wait, args=(a, Wait("for the plan"), None))
    waiter.start()
    asked_again.wait()
    assert handled == ["old news"] and waiter.is_alive()

    def change():
        handled.append("news")
        state["changes"] += 1
    a.events.put(WatchDelivery("peer", 1, change))
    waiter.join()
    assert handled == ["old news", "news"] and state["calls"] == 3


def test_any_other_event_or_the_deadline_ends_the_wait_at_once(monkeypatch):
    a = waiting_agent(monkeypatch, lambda: 0)
    a.events.put(Leave("the owner ends it"))
    Agent._wait(a, Wait("for the plan"), None)  # a Leave changes no news, but is no watch delivery
    assert a.events.empty()
    Agent._wait(a, Wait("for the plan", deadline=0.0), None)  # nothing came by the deadline
