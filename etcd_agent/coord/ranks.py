"""Group ranks for a round: who gets which rank (``rank_joiners``) and the plan that makes (``build_plan``).

Invariants: a node started with ``--node-rank k`` (its join record's ``node_rank``) has group rank k; the others fill
the free ranks in stable order: members of the previous plan keep their relative order, newcomers follow in join
order. Ranks are exactly 0..n-1: while a pin is >= the number of members the plan would have, the ranking is blocked
(missing ranks). Spares (``--spare``, or any newcomer to a job whose last plan was full) come last and take the
holes lost members left, every other member keeping its rank. Worker ranks are prefix sums of nproc over group
ranks; the master is group rank 0.

Pure: no I/O. Imports ``coord.mirror`` and ``schema.values`` only (``decide.Params`` for its annotations).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .mirror import View
from ..schema.values import Join, Member, Plan

if TYPE_CHECKING:
    from .decide import Params


def plan_size(v: View, p: Params) -> int:
    """How many members spares may fill a plan up to: as many as the last plan had (a spare takes a lost or
    quarantined member's place), at least MIN."""
    return max(p.min_nodes, v.last_plan.group_world_size if v.last_plan else 0)


def as_spares(v: View, p: Params) -> list[Join]:
    """The round's joiners, a node beyond MAX counted as a spare: when the newest earlier plan was full (MAX
    members), a joiner that was not in it waited outside a full job, and it comes in only in place of a lost (or
    quarantined) member, taking that member's group rank while every other member keeps its own, exactly as a
    ``--spare`` does. Other newcomers (a job below MAX) follow in join order."""
    joins = list(v.joins.values())
    last = v.last_plan
    if last is None or last.group_world_size < p.max_nodes:
        return joins
    return [j if j.spare or last.member(j.node) is not None else dataclasses.replace(j, spare=True) for j in joins]


@dataclasses.dataclass(frozen=True)
class Ranking:
    """Who gets which group rank; ``blocked`` says why no valid plan can be made yet ('' when one can)."""

    members: tuple[Join, ...]  # in group-rank order: members[k] gets group rank k (when not blocked)
    missing: tuple[int, ...] = ()  # group ranks below a pinned one that no joiner can fill yet
    conflicts: tuple[str, ...] = ()  # pins no plan can honour (two joiners with one rank, a rank >= max_nodes)

    @property
    def blocked(self) -> str:
        why = list(self.conflicts)
        if self.missing:
            pins = ", ".join(f"{j.node} has --node-rank {j.node_rank}" for j in self.members
                             if j.node_rank is not None and j.node_rank > self.missing[0])
            why.append(f"group rank(s) {_spans(self.missing)} have no node yet ({pins})")
        return "; ".join(why)


def rank_joiners(joins: list[Join], max_nodes: int, fill_to: int = 0) -> Ranking:
    """Group ranks. A pinned joiner (``--node-rank k``) gets rank k; the others fill the free ranks in stable order
    (previous plan's order, then join order), up to ``max_nodes`` members. Spares (``--spare``) come last, and only
    up to ``fill_to`` members: a plan with a spare keeps every previous member at its rank (``prev_rank``) and puts
    the spares in the holes the lost members left. Ranks must be exactly 0..n-1, so while a pin is >= the number of
    members the ranking is blocked (missing ranks). Of two joiners with one pin the earlier keeps it and the later
    is left out, blocking too (the leased rank claim makes that unreachable)."""
    pinned: dict[int, Join] = {}
    conflicts = []
    for j in sorted((j for j in joins if j.node_rank is not None), key=lambda j: j.create_revision):
        if j.node_rank >= max_nodes:
            conflicts.append(f"{j.node} has --node-rank {j.node_rank}, outside 0..{max_nodes - 1}")
        elif j.node_rank in pinned:
            conflicts.append(f"{j.node} and {pinned[j.node_rank].node} both have --node-rank {j.node_rank}")
        else:
            pinned[j.node_rank] = j
    order = lambda j: (j.prev_rank is None, j.prev_rank or 0, j.create_revision)  # noqa: E731
    free = sorted((j for j in joins if j.node_rank is None and not j.spare), key=order)
    spares = sorted((j for j in joins if j.node_rank is None and j.spare), key=order)
    free += spares[: max(0, fill_to - len(pinned) - len(free))]
    size = min(len(pinned) + len(free), max_nodes)
    ranks = max(size, max(pinned, default=-1) + 1)
    taken = free[: size - len(pinned)]
    slots, rest = dict(pinned), []
    keep = any(j.spare for j in taken)  # spares fill the holes: the others keep their ranks
    for j in taken:
        if keep and j.prev_rank is not None and j.prev_rank < ranks and j.prev_rank not in slots:
            slots[j.prev_rank] = j
        else:
            rest.append(j)
    fill = iter(rest)
    members, missing = [], []
    for rank in range(ranks):
        j = slots.get(rank) or next(fill, None)
        if j is None:
            missing.append(rank)
        else:
            members.append(j)
    return Ranking(tuple(members), tuple(missing), tuple(conflicts))


def build_plan(number: int, joins: list[Join], p: Params, restart_count: int) -> Plan:
    """The plan of a ranking that is not blocked (see ``rank_joiners``). Worker ranks are prefix sums of nproc
    over group ranks. The master is group rank 0: its ``--master-addr``/``--master-port`` if it was given them,
    else its address and the port it found free."""
    ranking = rank_joiners(joins, p.max_nodes, p.min_nodes)
    if ranking.blocked:
        raise ValueError(f"no plan for round {number}: {ranking.blocked}")
    return make_plan(number, ranking, p, restart_count)


def make_plan(number: int, ranking: Ranking, p: Params, restart_count: int) -> Plan:
    members, offset = [], 0
    for rank, j in enumerate(ranking.members):
        members.append(Member(j.node, rank, j.host, j.addr, j.nproc, offset))
        offset += j.nproc
    first = ranking.members[0]
    return Plan(number, tuple(members), first.master_addr or first.addr, first.master_port or first.port,
                restart_count, p.max_restarts)


def _spans(ranks: tuple[int, ...]) -> str:
    """``1, 3-5`` for (1, 3, 4, 5)."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
