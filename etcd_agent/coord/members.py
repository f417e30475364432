"""Who of the registered nodes a running round is about: the healthy ones, the newcomers a scale-up is for, those
a scale-up passed over, the members that have finished and those this agent sees lost. Pure functions over a
``View`` (``decide`` and ``observe`` use them); imports ``coord.mirror`` and ``schema.values`` only.
"""

from __future__ import annotations

from .mirror import View
from ..schema.values import Phase


def healthy(v: View) -> set[str]:
    """The registered nodes that passed their health check (an unhealthy one joins no round until it passes, and
    one still checking counts only once a check passed)."""
    return {n for n, info in v.nodes.items() if not info.health and not info.checking}


def newcomers(v: View) -> list[str]:
    """The healthy nodes (not spares) outside a running round's plan that a scale-up is for: all of them, except
    those a scale-up already passed over (``passed_over``)."""
    if v.plan is None or v.round is None or v.round.phase != Phase.RUNNING:
        return []
    over = passed_over(v)
    return sorted(n for n in healthy(v) if v.plan.outside(n) and not v.nodes[n].spare and n not in over)


def passed_over(v: View) -> set[str]:
    """The nodes outside the plan of a running scale-up round whose registry entry was not written since the
    scale-up was decided: it was made for them and did not admit them (a forged entry, a node that could not
    join in time). No scale-up is made for them again until their entry changes."""
    r = v.round
    if v.plan is None or r is None or r.scaled_for is None or r.phase != Phase.RUNNING:
        return set()
    return {n for n, info in v.nodes.items()
            if v.plan.outside(n) and not info.spare and info.mod_revision <= r.scaled_for}


def member_exits(v: View) -> frozenset[str]:
    """The round's exit keys that belong to members of its plan (a key of any other node is no member's)."""
    return frozenset(n for n in v.exits if v.plan is not None and not v.plan.outside(n))


def lost_members(v: View, node: str, lease: int) -> list[str]:
    """The running round's members this view watches whose join key is gone, that have not finished: every member
    for a full view (the leader's), else this node and the ring peer it watches. This node counts as lost when its
    join key is an older session's (``lease``: its current one; it fenced and came back)."""
    plan = v.plan
    if plan is None:
        return []
    watched = plan.nodes if v.full else [n for n in (node, *sorted(v.scope.watched)) if not plan.outside(n)]
    exits = member_exits(v)  # an exit key of a node outside the plan is no member's: ignored
    mine = v.joins.get(node)
    stale = mine is not None and mine.lease != lease
    return [n for n in watched if n not in exits and (n not in v.joins or (n == node and stale))]
