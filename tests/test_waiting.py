"""wait_note(action, view, local, params, forming, said, now) over hand-built views (the builders of
views.py), with the Wait that decide() gives for them: what the agent says while a round forms, when, and
when it wakes to say it again."""

from __future__ import annotations

import dataclasses

from views import ME, NOW, PARAMS, WALL, jn, me, view

from etcd_agent.coord.decide import Wait, decide
from etcd_agent.coord.mirror import JOINING, Scope
from etcd_agent.coord.waiting import WAIT_NOTE_PERIOD, Note, Said, wait_note
from etcd_agent.schema.values import NodeInfo

LOCAL = me(round=3, round_seen_at=NOW)  # the round's join timeout (60 s) runs from NOW


def forming(joins, nodes, **kw):
    return view(number=3, phase=JOINING, joins=joins, nodes=nodes, **kw)


def note(v, local=LOCAL, said=Said(), at: float = NOW + 10, params=PARAMS) -> Note:
    local = dataclasses.replace(local, now=at)
    return wait_note(decide(v, local, params), v, local, params, True, said, at)


def test_a_forming_round_says_who_joined_who_is_missing_and_when_it_times_out():
    first = note(forming([ME], (ME, "node-b")))
    assert first.line == ("waiting: round 3 has 1 of 2 node(s); joined: node-a (1 of --nnodes 2:4); 1 more needed; "
                          "registered but not joined: node-b; the round times out in 50 s (--join-timeout)")
    assert first.next_at == NOW + 10 + WAIT_NOTE_PERIOD  # the agent's wait wakes for the next line
    alone = note(forming([ME], (ME,)))
    assert "1 more needed; no other node registered" in alone.line


def test_nothing_changed_is_said_again_only_after_the_period_and_briefly():
    v = forming([ME], (ME, "node-b"))
    said = note(v).said
    quiet = note(v, said=said, at=NOW + 11)
    assert quiet == Note("", said, NOW + 10 + WAIT_NOTE_PERIOD)  # just said: DEBUG, and the same wake-up
    again = note(v, said=said, at=NOW + 10 + WAIT_NOTE_PERIOD)
    left = 60 - 10 - WAIT_NOTE_PERIOD
    assert again.line == f"still waiting for 1 of 2 node(s) in round 3, {left:.0f} s left (--join-timeout)"
    assert again.said.at == NOW + 10 + WAIT_NOTE_PERIOD


def test_the_line_says_who_joined_and_registered_since_the_last_one_and_the_last_call():
    said = note(forming([ME], (ME, "node-b"))).said
    local = dataclasses.replace(LOCAL, min_reached_at=NOW + 11)  # MIN reached: a 100 s last call runs
    params = dataclasses.replace(PARAMS, last_call=100.0)
    v = forming([ME, "node-b"], (ME, "node-b", "node-c"))
    got = note(v, local, said, NOW + 12, params)
    assert got.line == ("waiting: round 3 has 2 node(s); last call for others; node-b joined, node-c registered "
                        "since the last line; joined: node-a, node-b (2 of --nnodes 2:4); room for 2 more; "
                        "registered but not joined: node-c; the last call closes it in 99 s (--last-call)")
    still = note(v, local, got.said, NOW + 12 + WAIT_NOTE_PERIOD, params)
    assert still.line == (f"still waiting in round 3 with 2 node(s), room for 2 more (--nnodes 2:4), the last call "
                          f"closes it in {99 - WAIT_NOTE_PERIOD:.0f} s")


def test_a_node_that_left_the_round_or_deregistered_is_named_once():
    said = Said("round 3 has 2 node(s); last call for others", NOW, 3, frozenset({ME, "node-b"}),
                frozenset({"node-c"}))
    got = note(forming([ME], (ME, "node-b")), said=said)
    assert "; node-b left the round, node-c deregistered since the last line; joined: node-a (1 of --nnodes 2:4)" \
        in got.line
    assert "registered but not joined: node-b;" in got.line
    other_round = dataclasses.replace(said, round=2)
    assert "since the last line" not in note(forming([ME], (ME, "node-b")), said=other_round).line


def test_registered_nodes_that_cannot_join_say_why_and_long_lists_are_counted():
    nodes = (ME, "node-b", "node-c", "node-d", *(f"node-x{i:02}" for i in range(9)))
    v = forming([ME], nodes)
    v = dataclasses.replace(v, nodes={**v.nodes, "node-b": NodeInfo("node-b", health="GPU 0 is lost\nmore"),
                                      "node-c": NodeInfo("node-c", checking=True),
                                      "node-d": NodeInfo("node-d", spare=True)})
    line = note(v).line
    assert ("registered but not joined: node-b (unhealthy: GPU 0 is lost), node-c (checking its health), node-d "
            "(spare), node-x00, node-x01, node-x02, node-x03, node-x04 and 4 more;") in line


def test_a_joiner_that_does_not_lead_names_its_leader_and_the_time_left_from_the_rounds_opening():
    v = forming([jn("node-b", 100), jn(ME, 101)], (ME, "node-b"))
    v = dataclasses.replace(v, scope=Scope(False, frozenset({"node-b"})))
    first = note(v)
    assert first.line == "waiting: joined round 3; node-b leads it; the round times out in about 50 s (--join-timeout)"
    again = note(v, said=first.said, at=NOW + 10 + WAIT_NOTE_PERIOD)
    assert again.line.startswith("still waiting: joined round 3; node-b leads it, about ")
    assert again.line.endswith(" s left (--join-timeout)")
    opened_earlier = dataclasses.replace(v, round=dataclasses.replace(v.round, time=WALL - 30))  # 30 s before now
    assert note(opened_earlier).line.endswith("; the round times out in about 30 s (--join-timeout)")


def test_a_registration_alone_waits_for_the_next_line_which_names_it():
    said = note(forming([ME], (ME,))).said
    v = forming([ME], (ME, "node-b"))
    assert note(v, said=said, at=NOW + 11).line == ""
    later = note(v, said=said, at=NOW + 10 + WAIT_NOTE_PERIOD).line
    assert later.startswith("waiting: round 3 has 1 of 2 node(s); node-b registered since the last line; ")


def test_outside_a_forming_round_the_wait_is_debug_only_and_wakes_nobody():
    said = Said("x", NOW)
    got = wait_note(Wait("round 3 running with 2 node(s)"), view(), LOCAL, PARAMS, False, said, NOW + 99)
    assert got == Note("", said, None)


def test_a_wait_outside_a_forming_round_is_said_when_it_changes_only():
    w = Wait("round 3 runs without this node; waiting to be taken into the next round")
    got = wait_note(w, view(), LOCAL, PARAMS, True, Said(), NOW)
    assert got == Note(f"waiting: {w.why}", Said(w.why, NOW, 3), None)  # no round forms: nothing to wake for
    assert wait_note(w, view(), LOCAL, PARAMS, True, got.said, NOW + 9 * WAIT_NOTE_PERIOD) == Note("", got.said, None)
    unsure = Wait("this node's health check is running; it joins round 3 once the check passes")
    again = wait_note(unsure, forming([], (ME,)), LOCAL, PARAMS, True, got.said, NOW + WAIT_NOTE_PERIOD)
    assert again.line.startswith(f"waiting: {unsure.why}; joined: none (0 of --nnodes 2:4); 2 more needed")
