"""Group ranks for a round: who gets which rank (``rank_joiners``) and the plan that makes (``build_plan``).

Invariants: a node started with ``--node-rank k`` (its join record's ``node_rank``) has group rank k; the others fill
the free ranks in stable order: members of the previous plan keep their relative order, newcomers follow in join
order. Ranks are exactly 0..n-1: while a pin is >= the number of members the plan would have, the ranking is blocked
(missing ranks). Spares (``--spare``, or any newcomer to a job whose last plan was full) come last and take the
holes lost members left, every other member keeping its rank. Worker ranks are prefix sums of nproc over group
ranks; the master is group rank 0.

Topology (``--topology``, ``schema/topology.py``): nodes that share a deeper block get consecutive ranks. The first
plan sorts the nodes by path (then by join order); later plans keep the previous members' order as above, and put
a newcomer right after the last previous member that shares its deepest block (a newcomer that shares none comes
last, newcomers sorted by path). A lost rank goes to the filler (a spare, or a newcomer when spares are taken) in
the lost member's deepest block, as the last plan's entry for it says. Nodes without a path are one block at the
root: a job in which no node has one is ranked exactly as without this rule.

Pure: no I/O. Imports ``coord.mirror``, ``schema.values`` and ``schema.topology`` only (``decide.Params`` for its
annotations).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import TYPE_CHECKING, Callable

from .mirror import View
from ..schema import topology
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
    paths: tuple[str, ...] = ()  # the members' topology paths, in the same order (() when none has one)

    @property
    def blocked(self) -> str:
        why = list(self.conflicts)
        if self.missing:
            pins = ", ".join(f"{j.node} has --node-rank {j.node_rank}" for j in self.members
                             if j.node_rank is not None and j.node_rank > self.missing[0])
            why.append(f"group rank(s) {_spans(self.missing)} have no node yet ({pins})")
        return "; ".join(why)


def rank_round(v: View, p: Params, joins: list[Join]) -> Ranking:
    """``rank_joiners`` for a round's leader: each joiner's topology path from its registry entry, each lost rank's
    from the last plan's entry for it (the lost node's registry entry went with its lease)."""
    nodes, last = v.nodes, v.last_plan

    def where(node: str) -> str:
        info = nodes.get(node)
        return info.topology if info is not None else ""

    def lost(rank: int) -> str:
        return last.members[rank].topology if last is not None and last.complete and rank < len(last.members) else ""

    return rank_joiners(joins, p.max_nodes, plan_size(v, p), where, lost)


def rank_joiners(joins: list[Join], max_nodes: int, fill_to: int = 0, where: Callable[[str], str] | None = None,
                 lost: Callable[[int], str] | None = None) -> Ranking:
    """Group ranks. A pinned joiner (``--node-rank k``) gets rank k; the others fill the free ranks in stable order
    (previous plan's order, then join order), up to ``max_nodes`` members. Spares (``--spare``) come last, and only
    up to ``fill_to`` members: a plan with a spare keeps every previous member at its rank (``prev_rank``) and puts
    the spares in the holes the lost members left. Ranks must be exactly 0..n-1, so while a pin is >= the number of
    members the ranking is blocked (missing ranks). Of two joiners with one pin the earlier keeps it and the later
    is left out, blocking too (the leased rank claim makes that unreachable). ``where``: a node's topology path;
    ``lost``: the path of the member that held a rank in the last plan (see the module's docstring)."""
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
    paths = _Paths(where, lost, joins)
    room = max(0, fill_to - len(pinned) - len(free))  # spares that may come in
    size = min(len(pinned) + len(free) + min(room, len(spares)), max_nodes)
    ranks = max(size, max(pinned, default=-1) + 1)
    taken = free[: size - len(pinned)]
    slots, rest = dict(pinned), []
    keep = size - len(pinned) - len(taken)  # spares taken: they fill the holes, the others keep their ranks
    for j in taken:
        if keep and j.prev_rank is not None and j.prev_rank < ranks and j.prev_rank not in slots:
            slots[j.prev_rank] = j
        else:
            rest.append(j)
    if keep:
        slots.update(_fill([rank for rank in range(ranks) if rank not in slots], rest, spares, keep, paths))
    fill = iter(() if keep else paths.arrange(rest))
    members, missing = [], []
    for rank in range(ranks):
        j = slots.get(rank) or next(fill, None)
        if j is None:
            missing.append(rank)
        else:
            members.append(j)
    return Ranking(tuple(members), tuple(missing), tuple(conflicts),
                   tuple(paths.text(j.node) for j in members) if paths.any else ())


class _Paths:
    """The topology paths a ranking looks at, as components; ``any`` is False when no joiner has one, and the
    ranking is then the one without topology."""

    def __init__(self, where: Callable[[str], str] | None, lost: Callable[[int], str] | None, joins: list[Join]):
        self.where, self.lost_text = where, lost
        self.any = where is not None and any(where(j.node) for j in joins)

    def text(self, node: str) -> str:
        return self.where(node) if self.where is not None else ""

    def of(self, node: str) -> tuple[str, ...]:
        return topology.parse(self.text(node))

    def lost(self, rank: int) -> tuple[str, ...]:
        return topology.parse(self.lost_text(rank)) if self.lost_text is not None else ()

    def arrange(self, taken: list[Join]) -> list[Join]:
        """``taken`` (in stable order: previous members by rank, then join order) in topology order: previous members
        keep their order; a newcomer goes after the last previous member that shares its deepest block, newcomers
        after one member by how deep they share, then by path and join order; one that shares none goes last."""
        if not self.any or all(j.prev_rank is not None for j in taken):  # no newcomer: the order stays
            return taken
        texts = [self.text(j.node) for j in taken]
        place = {t: i for i, t in enumerate(sorted(set(texts), key=lambda t: topology.sort_key(topology.parse(t))))}
        last: dict[tuple[str, ...], int] = {}  # block -> the last position of a previous member in it
        for i, j in enumerate(taken):
            if j.prev_rank is not None:
                parts = topology.parse(texts[i])
                for d in range(1, len(parts) + 1):
                    last[parts[:d]] = i
        keys = []
        for i, j in enumerate(taken):
            if j.prev_rank is not None:
                keys.append((i, 0))
                continue
            parts = topology.parse(texts[i])
            at = next((d for d in range(len(parts), 0, -1) if parts[:d] in last), 0) if last else 0
            keys.append((last[parts[:at]] if at else len(taken), 1, -at, place[texts[i]], j.create_revision))
        return [taken[i] for i in sorted(range(len(taken)), key=keys.__getitem__)]


def _fill(holes: list[int], rest: list[Join], spares: list[Join], count: int, paths: _Paths) -> dict[int, Join]:
    """Who fills the holes lost members left: every joiner of ``rest`` and ``count`` of the spares. A hole goes to
    a filler in the lost member's deepest block first, ties to the lower hole and the earlier filler (``rest``
    before the spares); without topology that is ``rest``, then the spares, into the holes in ascending order."""
    fillers = rest + spares
    spare = {id(j) for j in spares}
    used: set[int] = set()
    filled: dict[int, Join] = {}
    depth = max((len(paths.lost(h)) for h in holes), default=0) if paths.any else 0
    for d in range(depth, -1, -1):
        queues: dict[tuple[str, ...], deque] = {}
        for j in fillers:
            parts = paths.of(j.node) if d else ()
            if id(j) not in used and len(parts) >= d:
                queues.setdefault(parts[:d], deque()).append(j)
        for h in holes:
            block = paths.lost(h)[:d] if d else ()
            queue = queues.get(block) if h not in filled and len(block) == d else None
            while queue:
                j = queue.popleft()
                if id(j) in used or id(j) in spare and count == 0:
                    continue
                used.add(id(j))
                count -= id(j) in spare
                filled[h] = j
                break
    return filled


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
        path = ranking.paths[rank] if ranking.paths else ""
        members.append(Member(j.node, rank, j.host, j.addr, j.nproc, offset, path))
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
