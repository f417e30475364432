"""observe(view, local, params, now, wall, lifted) over hand-built views (the builders of views.py): the first
sightings decide() times from, the round an agent is in, and what it says in its log."""

from __future__ import annotations

import dataclasses

from views import ME, NOW, PARAMS, WALL, jn, me, mk_plan, view

from etcd_agent.coord.mirror import JOINING, RUNNING, Scope
from etcd_agent.coord.observe import Notes, observe
from etcd_agent.schema.values import NodeInfo, RoundInfo


def later(local, seconds: float):
    """``local`` as the next step sees it: the clock moved on."""
    return dataclasses.replace(local, now=local.now + seconds, wall=local.wall + seconds)


def test_the_clock_is_taken_as_given():
    local, _ = observe(view(), me(now=1.0, wall=2.0), PARAMS, NOW + 5, WALL + 5)
    assert (local.now, local.wall) == (NOW + 5, WALL + 5)


def test_the_first_sight_of_a_round_is_noted_once():
    v = view(number=3, phase=JOINING, joins=["node-a"])
    local, notes = observe(v, me(), PARAMS, NOW, WALL)
    assert (local.round, local.round_seen_at, local.min_reached_at) == (3, NOW, None)
    assert notes == Notes(new_round=3)
    again, notes = observe(v, local, PARAMS, NOW + 7, WALL + 7)
    assert (again.round, again.round_seen_at) == (3, NOW) and notes.new_round is None  # the timeout runs from NOW
    nxt, notes = observe(view(number=4, phase=JOINING, joins=["node-a"]), again, PARAMS, NOW + 9, WALL + 9)
    assert (nxt.round, nxt.round_seen_at, notes.new_round) == (4, NOW + 9, 4)


def test_no_round_key_yet_notes_nothing():
    local, notes = observe(view(round_present=False, phase=JOINING, joins=()), me(), PARAMS, NOW, WALL)
    assert (local.round, local.round_seen_at, local.min_reached_at, notes) == (0, 0.0, None, Notes())


def test_the_last_call_runs_from_the_first_sight_of_min_joiners_and_starts_again_below_min():
    one = view(number=3, phase=JOINING, joins=["node-a"])
    two = view(number=3, phase=JOINING, joins=["node-a", "node-b"])  # PARAMS.min_nodes is 2
    local, _ = observe(one, me(), PARAMS, NOW, WALL)
    assert local.min_reached_at is None
    local, _ = observe(two, local, PARAMS, NOW + 1, WALL + 1)
    assert local.min_reached_at == NOW + 1
    local, _ = observe(two, local, PARAMS, NOW + 2, WALL + 2)
    assert local.min_reached_at == NOW + 1  # kept
    local, _ = observe(one, local, PARAMS, NOW + 3, WALL + 3)
    assert local.min_reached_at is None  # one left: the last call starts again when MIN is back
    local, _ = observe(two, local, PARAMS, NOW + 4, WALL + 4)
    assert local.min_reached_at == NOW + 4


def test_a_new_round_with_min_joiners_starts_its_last_call_on_the_next_look():
    """The first sight of a round clears the last call; MIN joiners seen then start it on the following step (as
    the agent always did: the round's first view only resets it)."""
    local, _ = observe(view(number=3, phase=JOINING, joins=["node-a", "node-b"]), me(), PARAMS, NOW, WALL)
    assert local.min_reached_at == NOW  # no earlier sighting: MIN is seen at once
    v4 = view(number=4, phase=JOINING, joins=["node-a", "node-b"])
    local, notes = observe(v4, local, PARAMS, NOW + 5, WALL + 5)
    assert notes.new_round == 4 and local.min_reached_at is None
    local, _ = observe(v4, local, PARAMS, NOW + 6, WALL + 6)
    assert local.min_reached_at == NOW + 6


def newcomer_view(c_revision: int = 900, scaled_for: int | None = None):
    """Round 3 runs with node-a and node-b; node-c registered outside the plan."""
    v = view(number=3, nodes=("node-a", "node-b", "node-c"), plan=mk_plan(3, ["node-a", "node-b"]))
    nodes = dict(v.nodes, **{"node-c": NodeInfo("node-c", "host-node-c", pid=1, mod_revision=c_revision)})
    return dataclasses.replace(v, nodes=nodes, round=RoundInfo(3, RUNNING, "", 500, scaled_for=scaled_for))


def test_a_newcomer_is_timed_from_its_first_sight_until_none_is_left():
    local, _ = observe(newcomer_view(), me(round=3), PARAMS, NOW, WALL)
    assert local.newcomers_since == NOW
    local, _ = observe(newcomer_view(), local, PARAMS, NOW + 1, WALL + 1)
    assert local.newcomers_since == NOW  # the scale-up settles from the first sight
    local, _ = observe(view(number=3), local, PARAMS, NOW + 2, WALL + 2)
    assert local.newcomers_since is None


def test_the_nodes_a_scale_up_passed_over_are_noted_by_a_full_view_only():
    passed = newcomer_view(c_revision=900, scaled_for=950)  # node-c's entry is older than the scale-up for it
    local, notes = observe(passed, me(round=3), PARAMS, NOW, WALL)
    assert notes.passed_over == (("node-c", 900),) and local.newcomers_since is None  # no scale-up for it again
    partial = dataclasses.replace(passed, scope=Scope(False))
    assert observe(partial, me(round=3), PARAMS, NOW, WALL)[1].passed_over == ()
    rewritten = newcomer_view(c_revision=960, scaled_for=950)  # it rewrote its entry since: not passed over
    local, notes = observe(rewritten, me(round=3), PARAMS, NOW, WALL)
    assert notes.passed_over == () and local.newcomers_since == NOW


def test_a_lifted_quarantine_makes_an_unhealthy_node_check_again_now():
    unhealthy = me(round=3, unhealthy="quarantined until 12:00:00", health_retry_at=NOW + 500)
    assert observe(view(), unhealthy, PARAMS, NOW, WALL, lifted=True)[0].health_retry_at == NOW
    assert observe(view(), unhealthy, PARAMS, NOW, WALL, lifted=False)[0].health_retry_at == NOW + 500
    healthy = me(round=3, health_retry_at=0.0)
    assert observe(view(), healthy, PARAMS, NOW, WALL, lifted=True)[0].health_retry_at == 0.0


def test_observe_leaves_what_the_node_knows_alone():
    """Workers, checks and the pending failure are the node's objects' to say, never the view's."""
    local = me(round=3, workers_round=3, workers_running=True, checking=True, draining=True, lease=7, ready=False)
    got, _ = observe(view(joins=[jn("node-a", 100), jn("node-b", 101)]), local, PARAMS, NOW + 1, WALL + 1)
    assert dataclasses.replace(got, now=local.now, wall=local.wall, min_reached_at=None, lost_since=None) == local



def test_the_first_sight_of_a_lost_member_is_noted_once_and_cleared_with_it():
    """A member of the running round whose join key is gone: the loss-end grace runs from its first sighting."""
    lost = view(nodes=[ME, "node-b"], joins=[ME])
    local, _ = observe(lost, me(round=3), PARAMS, NOW, WALL)
    assert local.lost_since == NOW
    again, _ = observe(lost, later(local, 1.5), PARAMS, NOW + 1.5, WALL + 1.5)
    assert again.lost_since == NOW
    back, _ = observe(view(nodes=[ME, "node-b"]), again, PARAMS, NOW + 2, WALL + 2)  # every member joined
    assert back.lost_since is None
    joining, _ = observe(view(number=4, phase=JOINING, joins=[ME]), again, PARAMS, NOW + 3, WALL + 3)
    assert joining.lost_since is None  # a forming round has no members to lose
