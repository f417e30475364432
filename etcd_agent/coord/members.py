"""Who of the registered nodes a running round is about: the healthy ones, the newcomers a scale-up is for, those
a scale-up passed over, the members that have finished and those this agent sees lost. Pure functions over a
``View`` (``decide`` and ``observe`` use them); imports ``coord.mirror`` and ``schema.values`` only.

The round's leader asks them at every step, with N registry entries, joins and exits: a view from a mirror carries
its memo (``View.memo``), so each is made again only when what it is made of changed (the mirror's view keeps the
same nodes dict, joins dict, exits set and plan object while their keys do not change), and a round's member exits
grow by the exits that arrived. A step that only brings exits costs those exits; one that changes the joins or
the registry makes the sets read from them again. A view made alone (no memo) is computed afresh.
"""

from __future__ import annotations

from .mirror import View
from ..schema.values import Phase


def _memo(v: View, name: str, of: tuple, make):
    """``make()``, kept in the view's memo under ``name`` while the objects ``of`` are the same ones (identity)."""
    memo = v.memo
    if memo is None:
        return make()
    hit = memo.get(name)
    if hit is not None and len(hit[0]) == len(of) and all(a is b for a, b in zip(hit[0], of)):
        return hit[1]
    made = make()
    memo[name] = (of, made)
    return made


def healthy(v: View) -> frozenset[str]:
    """The registered nodes that passed their health check (an unhealthy one joins no round until it passes, and
    one still checking counts only once a check passed)."""
    return _memo(v, "healthy", (v.nodes,), lambda: frozenset(
        n for n, info in v.nodes.items() if not info.health and not info.checking))


def newcomers(v: View) -> list[str]:
    """The healthy nodes (not spares) outside a running round's plan that a scale-up is for: all of them, except
    those a scale-up already passed over (``passed_over``)."""
    if v.plan is None or v.round is None or v.round.phase != Phase.RUNNING:
        return []
    return list(_memo(v, "newcomers", (v.nodes, v.plan, v.round), lambda: _newcomers(v)))


def _newcomers(v: View) -> tuple[str, ...]:
    over = passed_over(v)
    return tuple(sorted(n for n in healthy(v) if v.plan.outside(n) and not v.nodes[n].spare and n not in over))


def passed_over(v: View) -> frozenset[str]:
    """The nodes outside the plan of a running scale-up round whose registry entry was not written since the
    scale-up was decided: it was made for them and did not admit them (a forged entry, a node that could not
    join in time). No scale-up is made for them again until their entry changes."""
    r = v.round
    if v.plan is None or r is None or r.scaled_for is None or r.phase != Phase.RUNNING:
        return frozenset()
    plan = v.plan
    return _memo(v, "passed_over", (v.nodes, plan, r), lambda: frozenset(
        n for n, info in v.nodes.items() if plan.outside(n) and not info.spare and info.mod_revision <= r.scaled_for))


def member_exits(v: View) -> frozenset[str]:
    """The round's exit keys that belong to members of its plan (a key of any other node is no member's). With a
    memo, the exits of the same plan that only grew since cost the ones that arrived."""
    plan, exits = v.plan, v.exits
    if plan is None:
        return frozenset()
    memo = v.memo
    hit = memo.get("member_exits") if memo is not None else None
    if hit is not None and hit[0] is plan and hit[1] is exits:
        return hit[2]
    if hit is not None and hit[0] is plan and hit[1] <= exits:
        made = hit[2] | {n for n in exits - hit[1] if not plan.outside(n)}
    else:
        made = frozenset(n for n in exits if not plan.outside(n))
    if memo is not None:
        memo["member_exits"] = (plan, exits, made)
    return made


def lost_members(v: View, node: str, lease: int) -> list[str]:
    """The running round's members this view watches whose join key is gone, that have not finished: every member
    for a full view (the leader's), else this node and the ring peer it watches. This node counts as lost when its
    join key is an older session's (``lease``: its current one; it fenced and came back)."""
    plan = v.plan
    if plan is None:
        return []
    exits = member_exits(v)  # an exit key of a node outside the plan is no member's: ignored
    stale = stale_join(v, node, lease)
    if v.full and not stale:  # the leader: the members without a join key, made again when the joins change
        unjoined = _memo(v, "unjoined", (plan, v.joins), lambda: tuple(n for n in plan.nodes if n not in v.joins))
        return [n for n in unjoined if n not in exits]
    watched = plan.nodes if v.full else [n for n in (node, *sorted(v.scope.watched)) if not plan.outside(n)]
    return [n for n in watched if n not in exits and (n not in v.joins or (n == node and stale))]


def stale_join(v: View, node: str, lease: int) -> bool:
    """``node``'s join key of this round belongs to a session it lost (``lease`` is its current one: it fenced and
    came back): it does not count."""
    mine = v.joins.get(node)
    return mine is not None and mine.lease != lease
