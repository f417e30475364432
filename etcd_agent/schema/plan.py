"""A round's plan, split so that each member reads a bounded part of it (O(N) bytes per round for the whole job,
not O(N^2)).

    P/r/<n>/plan        the header: round, world_size, group_world_size, master address and port, restart count,
                        max restarts, leader, and ``parts`` = B
    P/r/<n>/plan/<b>    part b (0 <= b < B): the members whose node name hashes to b (``part_of``), each spelled out
                        as ``[node, group_rank, nproc, addr, rank_offset, predecessor]``, plus its topology path
                        (``--topology``) as a seventh item when it has one

B = min(ceil(N / PART_SIZE), MAX_PARTS) for N members, and every part is written, an empty one too, so a part that
is absent was not read (not: holds nobody). A member finds its part from its own name and B (``RoundInfo.plan_parts``
says B before the plan is read), and its part says all it needs to start its workers: its ranks, the address of
the master (header), and its ring predecessor, whose loss it watches for. The leader, ``status`` and the exporter
read the whole ``r/<n>/plan`` prefix and assemble the full plan (``Plan.with_parts``).

A ``Plan`` may hold only some parts (a non-leader's mirror): it still answers what such a reader asks, from the
header (``world_size``, ``group_world_size``, ``leader_node``, ``restart_count``) and from the parts it holds
(``member``, ``predecessor``); ``outside(node)`` is True only where a held part shows the node is no member.
A header that still carries a ``members`` list (the format before plans were split) is a complete plan by itself.
Pure: imports ``errors``, ``schema.codec`` and ``schema.topology`` only.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import ClassVar, Iterable, NamedTuple

from ..errors import BadKeyData
from . import topology
from .codec import Record, convert, kv_field

# Members per part, about 1 KB: what every member reads and decodes per round besides the header (a part of 64, 4 KB,
# cost each member about 0.3 ms of CPU to read at N = 300 on 2 cores); up to MAX_PARTS x PART_SIZE = 1920 members.
PART_SIZE = 16
# etcd caps each branch of a txn at 128 operations (--max-txn-ops); the close txn's success branch holds the
# header, the parts, the round and two reads. At 10,000 members the parts hold about 700 KB in all: well under
# etcd's 1.5 MiB request limit (--max-request-bytes).
MAX_PARTS = 120
NAMED = 16  # members a running round's reason names (``Plan.summary``)


def parts_for(members: int) -> int:
    """B: how many parts a plan of ``members`` members is split into (at least one)."""
    return max(1, min(-(-members // PART_SIZE), MAX_PARTS))


def part_of(node: str, parts: int) -> int:
    """The part that holds ``node`` in a plan of ``parts`` parts: a stable hash of its name (the same in every
    process and Python version, unlike ``hash``)."""
    return zlib.crc32(node.encode()) % parts


class Member(NamedTuple):
    """One member of a plan."""

    node: str
    group_rank: int
    host: str
    addr: str
    nproc: int
    rank_offset: int
    topology: str = ""  # its topology path ("" none): a later round's leader gives its rank, if lost, to a neighbour


def _path(m: Member) -> list[str]:
    """A member's topology path as its entry's seventh item: none when it has none (an entry as before paths)."""
    return [m.topology] if m.topology else []


@dataclasses.dataclass(frozen=True)
class PlanPart(Record):
    """``P/r/<n>/plan/<b>``: the members of part b, as ``(member, predecessor)`` pairs in group-rank order."""

    round: int
    part: int
    entries: tuple[tuple[Member, str], ...] = ()

    def to_json(self) -> dict:
        return {"round": self.round, "part": self.part,
                "members": [[m.node, m.group_rank, m.nproc, m.addr, m.rank_offset, pred, *_path(m)]
                            for m, pred in self.entries]}

    @classmethod
    def from_json(cls, key: str, obj: dict, **kv) -> PlanPart:
        if not isinstance(obj, dict):
            raise BadKeyData(key, "not a JSON object")
        missing = [f for f in ("round", "part", "members") if f not in obj]
        if missing:
            raise BadKeyData(key, f"missing field(s) {', '.join(missing)}")
        if not isinstance(obj["members"], list):
            raise BadKeyData(key, f"bad plan part: members must be a list, not {obj['members']!r}")
        entries = []
        for i, m in enumerate(obj["members"]):
            if type(m) is list and len(m) == 6:  # the common entry, well formed: built without a check per field
                node, rank, nproc, addr, offset, pred = m
                if (type(node) is str and type(rank) is int and type(nproc) is int and type(addr) is str
                        and type(offset) is int and type(pred) is str and nproc >= 1 and rank >= 0 and offset >= 0):
                    entries.append((Member(node, rank, "", addr, nproc, offset), pred))
                    continue
            if not isinstance(m, list) or len(m) not in (6, 7):
                raise BadKeyData(key, f"bad plan part: member {i} must be [node, group_rank, nproc, addr, "
                                      f"rank_offset, predecessor] (and a topology path), not {m!r}")
            w = f"members[{i}]"
            node, rank, nproc, addr, offset, pred, *where = (convert(key, f"{w} {f}", kind, v) for f, kind, v in zip(
                ("node", "group_rank", "nproc", "addr", "rank_offset", "predecessor", "topology"),
                (str, int, int, str, int, str, str), m))
            if nproc < 1 or rank < 0 or offset < 0:
                raise BadKeyData(key, f"{w}: nproc must be at least 1, group_rank and rank_offset at least 0")
            try:
                topology.parse(where[0] if where else "")
            except ValueError as exc:
                raise BadKeyData(key, f"{w} topology {where[0]!r} {exc}") from None
            entries.append((Member(node, rank, "", addr, nproc, offset, *where), pred))
        return cls(convert(key, "round", int, obj["round"]), convert(key, "part", int, obj["part"]), tuple(entries))


@dataclasses.dataclass(frozen=True)
class Plan(Record):
    """A round's plan: the header's fields, and the members this reader holds in group-rank order (all of them
    when ``complete``). A plan made here (``ranks.make_plan``) is complete; ``header()`` and ``part_values()`` are
    what is stored."""

    HEADER: ClassVar[tuple[str, ...]] = ("round", "master_addr", "master_port", "restart_count")
    round: int
    members: tuple[Member, ...]
    master_addr: str
    master_port: int
    restart_count: int
    max_restarts: int = 0
    mod_revision: int = kv_field()
    leader: str = ""  # the member that closed the round: it watches the registry and the round's keys
    parts: int = 0  # B, the number of parts it is stored in (0: all members in the header, the older format)
    size: int = 0  # the header's group_world_size (0: len(members), a plan made here or an older one)
    workers: int = 0  # the header's world_size (0: the sum of the members' nproc)
    held: frozenset = frozenset()  # the parts this plan was assembled from
    preds: tuple[str, ...] = ()  # each held member's ring predecessor, as its part says ((): from the ring)

    @property
    def group_world_size(self) -> int:
        return self.size or len(self.members)

    @property
    def world_size(self) -> int:
        return self.workers or sum(m.nproc for m in self.members)

    @property
    def complete(self) -> bool:
        """Whether every member is held (the leader's, status's and the exporter's plans are)."""
        return len(self.members) == self.group_world_size

    @property
    def leader_node(self) -> str:
        return self.leader or (self.members[0].node if self.members and self.members[0].group_rank == 0 else "")

    def member(self, node: str) -> Member | None:
        """The member ``node``, if this plan holds it (a partial plan holds only its parts' members)."""
        return self._by_node.get(node, (None, 0))[0]

    def outside(self, node: str) -> bool:
        """Whether ``node`` is known to be no member: the plan is complete, or holds the part that would hold it."""
        if node in self._by_node:
            return False
        return self.complete or (self.parts > 0 and part_of(node, self.parts) in self.held)

    @functools.cached_property
    def _by_node(self) -> dict[str, tuple[Member, int]]:
        return {m.node: (m, i) for i, m in enumerate(self.members)}

    def predecessor(self, node: str) -> str | None:
        """The member before ``node`` in group-rank order, the last one for rank 0 (a ring): the one peer whose
        loss ``node`` watches for. None when ``node`` is not a member held here, or alone."""
        m, i = self._by_node.get(node, (None, 0))
        if m is None or self.group_world_size < 2:
            return None
        if self.preds:
            return self.preds[i]
        return self.members[m.group_rank - 1].node if self.complete else None

    @property
    def nodes(self) -> list[str]:
        """The members held, in group-rank order (every member of a complete plan)."""
        return [m.node for m in self.members]

    def summary(self) -> str:
        """How many nodes, and the first ``NAMED`` of them in group-rank order (a running round's reason: every
        agent reads it, so it stays short however large the plan)."""
        more = f" and {len(self.members) - NAMED} more" if len(self.members) > NAMED else ""
        return f"{len(self.members)} node(s): {', '.join(self.nodes[:NAMED])}{more}"

    def to_json(self) -> dict:
        """The header as stored (``P/r/<n>/plan``): everything but the members, who are in the parts."""
        return {"round": self.round, "world_size": self.world_size, "group_world_size": self.group_world_size,
                "master_addr": self.master_addr, "master_port": self.master_port,
                "restart_count": self.restart_count, "max_restarts": self.max_restarts, "leader": self.leader,
                "parts": self.parts or parts_for(len(self.members))}

    def header(self) -> bytes:
        return self.encode()

    def split(self) -> list[PlanPart]:
        """The parts of a complete plan, every one of the B (an empty one too), each member with its predecessor."""
        count = parts_for(len(self.members))
        entries: list[list] = [[] for _ in range(count)]
        for m in self.members:
            entries[part_of(m.node, count)].append((m, self.predecessor(m.node) or m.node))
        return [PlanPart(self.round, b, tuple(e)) for b, e in enumerate(entries)]

    def expanded(self) -> dict:
        """The plan with every member spelled out (``status --json``; ``topology`` only for a member that has one)."""
        return {**self.to_json(), "members": [{k: v for k, v in m._asdict().items() if v or k != "topology"}
                                              for m in self.members]}

    @classmethod
    def from_json(cls, key: str, obj: dict, mod_revision: int = 0) -> Plan:
        if not isinstance(obj, dict):
            raise BadKeyData(key, "not a JSON object")
        old = "members" in obj  # the older format: every member in the header
        required = cls.HEADER + (("members",) if old else ("parts", "group_world_size", "world_size"))
        missing = [f for f in required if f not in obj]
        if missing:
            raise BadKeyData(key, f"missing field(s) {', '.join(missing)}")
        fields = {f: convert(key, f, kind, obj.get(f, 0)) for f, kind in (
            ("round", int), ("master_addr", str), ("master_port", int), ("restart_count", int), ("max_restarts", int))}
        leader = convert(key, "leader", str, obj.get("leader") or "")
        if old:
            return cls(members=_members(key, obj["members"]), mod_revision=mod_revision, leader=leader, **fields)
        parts, size, workers = (convert(key, f, int, obj[f]) for f in ("parts", "group_world_size", "world_size"))
        if not 1 <= parts <= MAX_PARTS or size < 1 or workers < size:
            raise BadKeyData(key, f"bad plan: parts must be 1-{MAX_PARTS}, group_world_size at least 1 and "
                                  f"world_size at least group_world_size (got {parts}, {size}, {workers})")
        return cls(members=(), mod_revision=mod_revision, leader=leader, parts=parts, size=size, workers=workers,
                   **fields)

    def with_parts(self, key: str, parts: Iterable[PlanPart]) -> Plan:
        """This header with the members of ``parts`` (the parts read of its round; others are ignored). A header of
        the older format already holds every member. ``key`` names the plan in errors: a member in the wrong part,
        twice, or out of the plan's ranks is bad data, as are the ranks of a complete plan that are not 0..n-1."""
        if not self.parts:
            return self
        held, pairs = set(), []
        for p in parts:
            if p.round != self.round or not 0 <= p.part < self.parts or p.part in held:
                continue
            held.add(p.part)
            for m, pred in p.entries:
                if part_of(m.node, self.parts) != p.part or m.group_rank >= self.size:
                    raise BadKeyData(f"{key}/{p.part}", f"bad plan part: {m.node} (group rank {m.group_rank}) "
                                                        f"does not belong in part {p.part} of {self.parts}")
                pairs.append((m, pred))
        pairs.sort(key=lambda mp: mp[0].group_rank)
        ranks = [m.group_rank for m, _ in pairs]
        if len(set(ranks)) != len(ranks) or len({m.node for m, _ in pairs}) != len(pairs):
            raise BadKeyData(key, "bad plan: a group rank or a node is in it twice")
        return dataclasses.replace(self, members=tuple(m for m, _ in pairs), held=frozenset(held),
                                   preds=tuple(pred for _, pred in pairs))


def _members(key: str, raw) -> tuple[Member, ...]:
    """An older plan's members: compact ``[node, nproc, addr]`` lists in group-rank order, or spelled-out objects
    (as plans were written before they became compact)."""
    if not isinstance(raw, list) or not raw:
        raise BadKeyData(key, f"bad plan: members must be a non-empty list, not {raw!r}")
    members, offset = [], 0
    for rank, m in enumerate(raw):
        if isinstance(m, list) and len(m) == 3:
            (node, nproc, addr), host, group_rank = m, "", rank
        elif isinstance(m, dict):
            node, nproc, addr, host, group_rank = (m.get("node"), m.get("nproc"), m.get("addr"), m.get("host", ""),
                                                   m.get("group_rank"))
        else:
            raise BadKeyData(key, f"bad plan: member {rank} must be [node, nproc, addr], not {m!r}")
        where = f"members[{rank}]"
        member = Member(convert(key, f"{where} node", str, node), convert(key, f"{where} group_rank", int, group_rank),
                        convert(key, f"{where} host", str, host), convert(key, f"{where} addr", str, addr),
                        convert(key, f"{where} nproc", int, nproc), offset)
        if member.nproc < 1:
            raise BadKeyData(key, f"{where} nproc must be at least 1, got {member.nproc}")
        members.append(member)
        offset += member.nproc
    if [m.group_rank for m in members] != list(range(len(members))):
        raise BadKeyData(key, "bad plan: members are not in group-rank order 0..n-1")
    return tuple(members)
