"""The job's state as this agent sees it: a mirror of the keys it reads and watches, and typed views of it.

Each range in the mirror is filled by one read and then kept current by a watch from that read's revision + 1
("read, then watch"), and by the read-backs of this agent's own txns, so deciding never needs another read. News
of a key at or below what the mirror holds for it (or below its last delete, or below a read that covered it) is
ignored, which makes replays after a resumed watch harmless. A ``Scope`` says what the mirror covers: the round's
leader sees the registry and the whole round, the others only their own keys and one peer's. Records parse the
JSON values; a value that does not fit the schema raises BadKeyData naming the key. Pure: no I/O. Imports keys
and errors only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable, NamedTuple

from .errors import BadKeyData
from .keys import ROUND_DIGITS, Keys, decode, prefix_end, require

JOINING, RUNNING, DONE, FAILED, STOPPED = "joining", "running", "done", "failed", "stopped"
PHASES = (JOINING, RUNNING, DONE, FAILED, STOPPED)
FINAL_PHASES = (DONE, FAILED, STOPPED)


@dataclasses.dataclass(frozen=True)
class RoundInfo:
    number: int
    phase: str
    reason: str
    mod_revision: int
    last_plan: int | None = None  # the newest earlier round that had a plan (0: none; None: not recorded)


@dataclasses.dataclass(frozen=True)
class Join:
    node: str
    create_revision: int
    host: str
    addr: str
    port: int
    nproc: int
    prev_rank: int | None
    lease: int = 0  # the session lease the key is bound to: a node's old session shows up as another lease
    node_rank: int | None = None  # --node-rank: this node's group rank in every plan (None: not pinned)
    master_addr: str | None = None  # --master-addr/--master-port: the plan's master when this node is rank 0
    master_port: int | None = None


class Member(NamedTuple):
    """One member of a plan (a tuple: every member reads the whole plan each round, so making one is cheap)."""

    node: str
    group_rank: int
    host: str
    addr: str
    nproc: int
    rank_offset: int


@dataclasses.dataclass(frozen=True)
class Plan:
    round: int
    members: tuple[Member, ...]
    master_addr: str
    master_port: int
    restart_count: int
    max_restarts: int
    mod_revision: int = 0
    leader: str = ""  # the member that closed the round: it watches the registry and the round's keys

    @property
    def leader_node(self) -> str:
        return self.leader or self.members[0].node

    @property
    def world_size(self) -> int:
        return sum(m.nproc for m in self.members)

    def member(self, node: str) -> Member | None:
        return self._by_node.get(node)

    @functools.cached_property
    def _by_node(self) -> dict[str, Member]:
        return {m.node: m for m in self.members}

    def predecessor(self, node: str) -> str | None:
        """The member before ``node`` in group-rank order, the last one for rank 0 (a ring): the one peer whose
        loss ``node`` watches for. None when ``node`` is not a member or alone."""
        m = self.member(node)
        if m is None or len(self.members) < 2:
            return None
        return self.members[m.group_rank - 1].node

    @property
    def nodes(self) -> list[str]:
        return [m.node for m in self.members]

    def to_json(self) -> dict:
        """The plan as stored in etcd. Every member reads it once per round, so it is compact: one
        ``[node, nproc, addr]`` per member in group-rank order (group ranks and rank offsets follow from the order)."""
        return {"round": self.round, "world_size": self.world_size, "group_world_size": len(self.members),
                "master_addr": self.master_addr, "master_port": self.master_port,
                "restart_count": self.restart_count, "max_restarts": self.max_restarts, "leader": self.leader,
                "members": [[m.node, m.nproc, m.addr] for m in self.members]}

    def expanded(self) -> dict:
        """The plan with every member spelled out (``status --json``)."""
        return {**self.to_json(), "members": [m._asdict() for m in self.members]}


@dataclasses.dataclass(frozen=True)
class Restarts:
    used: int
    max: int
    mod_revision: int


@dataclasses.dataclass(frozen=True)
class View:
    """What decide() sees: the current round and everything it needs of the job."""

    revision: int
    spec: dict | None
    round: RoundInfo | None
    nodes: dict[str, dict]
    joins: dict[str, Join]
    plan: Plan | None
    last_plan: Plan | None  # the newest plan of an earlier round: who ran before
    exits: frozenset[str]
    failures: dict[str, dict]
    restarts: Restarts | None
    result: dict | None
    scope: Scope = None  # what the mirror covers (None: everything, as FULL)

    @property
    def full(self) -> bool:
        return self.scope is None or self.scope.full


def _dir(key: str) -> str:
    return key[: key.rfind("/") + 1]


def in_range(key: str, start: str, end: bytes) -> bool:
    """Whether ``key`` lies in the etcd range ``[start, end)``; an empty ``end`` is the single key ``start``."""
    if not end:
        return key == start
    raw = key.encode()
    return start.encode() <= raw and (end == b"\0" or raw < end)



@dataclasses.dataclass(frozen=True)
class Scope:
    """What an agent's mirror covers, so that decide() does not read an absence it never watched as a fact.

    ``full``: the registry and the whole current round are watched (the round leader, or a full read such as
    ``status``). Otherwise the mirror holds the job-wide keys, this node's own keys, the round's plan and the join
    keys of ``watched`` peers only."""

    full: bool = True
    watched: frozenset = frozenset()


FULL = Scope()


class Mirror:
    """The KVs under the job prefix that this agent reads and watches, kept current by watch events and by the
    results of its own txns.

    Several watches over different ranges feed one mirror, so there is no single "revision up to which everything
    is known": each key keeps its newest version (an event or txn result at or below what the mirror holds for
    that key, or below the key's last delete, is old news: replays of a resumed watch and txn results that the
    watch delivers again are harmless). A range is replaced as a whole by a read of it (``reset_range``).

    A view is built after every delivery, so what it parses is remembered per KV object (a KV is replaced, never
    changed, when its key changes): building a view costs O(keys) string work, and JSON decoding only for the keys
    that changed since the last view, not for every record of the job again.
    """

    def __init__(self, keys: Keys):
        self.keys = keys
        self.kvs: dict[str, object] = {}
        self.dirs: dict[str, dict[str, object]] = {}  # "a/b/" -> the KVs directly under it: a view reads dirs
        self.deleted: dict[str, int] = {}  # key -> revision of its newest delete seen
        self.revision = 0  # the newest revision seen anywhere (a read, an event, a txn)
        self.floors: dict[tuple[str, bytes], int] = {}  # range -> revision it was read at: older news is ignored
        self._memo: dict[tuple, tuple[object, object]] = {}  # (key, what) -> (the KV it was made from, result)

    def reset(self, kvs: Iterable, revision: int) -> None:
        """The whole mirror is a read of the whole prefix at ``revision``."""
        self.kvs = {kv.key: kv for kv in kvs}
        self.dirs = {}
        for kv in self.kvs.values():
            self.dirs.setdefault(_dir(kv.key), {})[kv.key] = kv
        self.deleted.clear()
        self.floors = {(self.keys.prefix, prefix_end(self.keys.prefix)): revision}
        self.revision = max(self.revision, revision)
        self._memo.clear()

    def reset_range(self, start: str, end: bytes, kvs: Iterable, revision: int) -> None:
        """The keys in ``[start, end)`` are exactly ``kvs``, as read at ``revision`` (a key changed after the read,
        already seen by an event, keeps its newer version)."""
        fresh = {kv.key: kv for kv in kvs}
        for key in [k for k in self.kvs if in_range(k, start, end) and k not in fresh]:
            if self.kvs[key].mod_revision <= revision:
                self._drop(key)
                self.deleted[key] = max(self.deleted.get(key, 0), revision)
        for kv in fresh.values():
            self._put(kv)
        self.floors[(start, end)] = max(self.floors.get((start, end), 0), revision)
        self.revision = max(self.revision, revision)

    def drop_range(self, start: str, end: bytes, keep: Callable[[str], bool] = lambda key: False) -> None:
        """Forget the keys in ``[start, end)`` (no longer watched), except those ``keep`` names."""
        for key in [k for k in self.kvs if in_range(k, start, end) and not keep(k)]:
            self._drop(key)
        for key in [k for k in self.deleted if in_range(k, start, end)]:
            del self.deleted[key]
        self.floors.pop((start, end), None)

    def _old(self, key: str, revision: int) -> bool:
        """Whether news of ``key`` at ``revision`` is older than a read that covered the key."""
        return any(revision <= floor and in_range(key, start, end) for (start, end), floor in self.floors.items())

    def _drop(self, key: str) -> None:
        if self.kvs.pop(key, None) is not None:
            d = self.dirs.get(_dir(key))
            if d is not None:
                d.pop(key, None)
                if not d:
                    del self.dirs[_dir(key)]
        for what in ("decode", "join", "parse", "plan"):
            self._memo.pop((key, what), None)

    def _put(self, kv) -> bool:
        if self._old(kv.key, kv.mod_revision):
            return False
        cur = self.kvs.get(kv.key)
        if (cur is not None and cur.mod_revision >= kv.mod_revision) or self.deleted.get(kv.key, 0) >= kv.mod_revision:
            return False
        self.kvs[kv.key] = kv
        self.dirs.setdefault(_dir(kv.key), {})[kv.key] = kv
        self.deleted.pop(kv.key, None)
        return True

    def _delete(self, key: str, revision: int) -> bool:
        if self._old(key, revision):
            return False
        cur = self.kvs.get(key)
        if cur is not None and cur.mod_revision > revision:
            return False  # created again after that delete
        self.deleted[key] = max(self.deleted.get(key, 0), revision)
        if cur is None:
            return False
        self._drop(key)
        return True

    def apply(self, events: Iterable) -> bool:
        """Apply one watch delivery; returns whether anything in it was new."""
        changed = False
        for ev in events:
            rev = ev.kv.mod_revision
            changed |= self._delete(ev.kv.key, rev) if ev.kind == "delete" else self._put(ev.kv)
            self.revision = max(self.revision, rev)
        return changed

    def absorb(self, kvs: Iterable, revision: int = 0) -> None:
        """KVs this agent read or wrote itself (a txn's own reads): as if their events had arrived."""
        for kv in kvs:
            self._put(kv)
        self.revision = max(self.revision, revision)

    def forget(self, key: str, revision: int) -> None:
        """A delete this agent made itself at ``revision``."""
        self._delete(key, revision)
        self.revision = max(self.revision, revision)

    def prune(self, before: int, keep_plan: int | None) -> None:
        """Forget the keys (and the reads) of rounds before ``before`` (nobody decides on them again), except the
        plan of round ``keep_plan`` (who ran last: prev_rank, the fast path)."""
        keep = self.keys.plan(keep_plan) if keep_plan else None

        def old(key: str) -> bool:
            rnd = self._round_of(key)
            return rnd is not None and rnd < before and key != keep
        for key in [k for k in list(self.kvs) + list(self.deleted) if old(k)]:
            self._drop(key)
            self.deleted.pop(key, None)
        for rng in [rng for rng in self.floors if old(rng[0])]:
            del self.floors[rng]

    def _round_of(self, key: str) -> int | None:
        """The round a key (or a range start) under ``r/`` belongs to; None for anything else."""
        rounds = self.keys.rounds()
        digits = key[len(rounds):len(rounds) + ROUND_DIGITS]
        if not key.startswith(rounds) or len(digits) != ROUND_DIGITS or not digits.isdigit():
            return None
        return int(digits)

    def _remembered(self, kv, what, make):
        """``make(kv)``, computed once per KV object (errors are not remembered: they are raised again)."""
        slot = (kv.key, what)
        hit = self._memo.get(slot)
        if hit is not None and hit[0] is kv:
            return hit[1]
        result = make(kv)
        self._memo[slot] = (kv, result)
        return result

    def get(self, key: str):
        return self.kvs.get(key)

    def value(self, key: str, required: tuple[str, ...] = ()) -> dict | None:
        kv = self.kvs.get(key)
        if kv is None:
            return None
        return require(key, self._decoded(kv), required)

    def _decoded(self, kv) -> dict:
        return self._remembered(kv, "decode", lambda kv: decode(kv.key, kv.value))

    def children(self, directory: str) -> list:
        """The KVs directly under ``directory`` (which ends with a slash): ``nodes/x`` but not ``nodes/x/y``."""
        return list(self.dirs.get(directory, {}).values())

    def under(self, prefix: str) -> list:
        return [kv for key, kv in self.kvs.items() if key.startswith(prefix)]

    def view(self, scope: Scope = FULL, revision: int | None = None) -> View:
        """The typed view; ``scope`` says what the mirror covers, ``revision`` through which revision the round's
        joins are known (default: the newest revision seen)."""
        k = self.keys
        rnd = self.round()
        number = rnd.number if rnd else 0
        # a registry entry without a lease is no live agent's (every agent registers on its session's lease)
        nodes = {kv.key[len(k.nodes()):]: self._decoded(kv) for kv in self.children(k.nodes()) if kv.lease}
        joins = ({j.node: j for j in (self._remembered(kv, "join", parse_join) for kv in self.children(k.joins(number)))}
                 if rnd else {})
        exits = frozenset(kv.key[len(k.exits(number)):] for kv in self.children(k.exits(number))) if rnd else frozenset()
        failures = ({kv.key[len(k.failures(number)):]: self._decoded(kv) for kv in self.children(k.failures(number))}
                    if rnd else {})
        last = self.last_plan(number) if rnd is None or rnd.last_plan is None else self.plan(rnd.last_plan)
        return View(self.revision if revision is None else revision, self.value(k.spec()), rnd, nodes, joins,
                    self.plan(number) if rnd else None, last, exits, failures, self.restarts(),
                    self.value(k.result()), scope)

    def round(self) -> RoundInfo | None:
        key = self.keys.round()
        obj = self.value(key, ("round", "phase"))
        if obj is None:
            return None
        if not isinstance(obj["round"], int) or obj["round"] < 1 or obj["phase"] not in PHASES:
            raise BadKeyData(key, f"round must be a positive integer and phase one of {', '.join(PHASES)}")
        last = obj.get("last_plan")
        if last is not None and (type(last) is not int or not 0 <= last < obj["round"]):
            raise BadKeyData(key, f"last_plan must be a round before {obj['round']} (0: none), not {last!r}")
        return RoundInfo(obj["round"], obj["phase"], str(obj.get("reason", "")), self.kvs[key].mod_revision,
                         last)

    def restarts(self) -> Restarts | None:
        key = self.keys.restarts()
        obj = self.value(key, ("used", "max"))
        if obj is None:
            return None
        if not all(type(obj[f]) is int and obj[f] >= 0 for f in ("used", "max")):
            raise BadKeyData(key, "used and max must be whole numbers")
        return Restarts(obj["used"], obj["max"], self.kvs[key].mod_revision)

    def last_plan(self, before: int) -> Plan | None:
        earlier = [p.round for p in (self._remembered(kv, "parse", self._parse) for kv in self.under(self.keys.rounds()))
                   if p is not None and p.kind == "plan" and p.round < before]
        return self.plan(max(earlier)) if earlier else None

    def _parse(self, kv):
        """The schema's reading of a key, or None for a key it does not name (ignored, never fatal)."""
        try:
            return self.keys.parse(kv.key)
        except BadKeyData:
            return None

    def plan(self, number: int) -> Plan | None:
        key = self.keys.plan(number)
        obj = self.value(key, ("round", "members", "master_addr", "master_port", "restart_count"))
        if obj is None:
            return None
        return self._remembered(self.kvs[key], "plan", lambda kv: parse_plan(key, obj, kv.mod_revision))


def parse_join(kv) -> Join:
    """A join record; ``node_rank``, ``master_addr`` and ``master_port`` are optional (older agents omit them)."""
    obj = decode(kv.key, kv.value, ("node", "addr", "port", "nproc"))
    try:
        prev = obj.get("prev_rank")
        pin, maddr, mport = obj.get("node_rank"), obj.get("master_addr"), obj.get("master_port")
        join = Join(str(obj["node"]), kv.create_revision, str(obj.get("host", "")), str(obj["addr"]),
                    int(obj["port"]), int(obj["nproc"]), None if prev is None else int(prev), kv.lease,
                    None if pin is None else int(pin), None if maddr is None else str(maddr),
                    None if mport is None else int(mport))
    except (TypeError, ValueError) as exc:
        raise BadKeyData(kv.key, f"bad field: {exc}") from exc
    if join.node_rank is not None and join.node_rank < 0:
        raise BadKeyData(kv.key, f"node_rank must be 0 or more, got {join.node_rank}")
    if join.master_port is not None and not 0 < join.master_port < 65536:
        raise BadKeyData(kv.key, f"master_port must be 1-65535, got {join.master_port}")
    return join


def parse_plan(key: str, obj: dict, mod_revision: int) -> Plan:
    try:
        members, offset = [], 0
        for rank, m in enumerate(obj["members"]):
            if isinstance(m, list):  # [node, nproc, addr]
                node, nproc, addr = m
                members.append(Member(str(node), rank, "", str(addr), int(nproc), offset))
            else:  # spelled out, as plans were written before they became compact
                members.append(Member(str(m["node"]), int(m["group_rank"]), str(m.get("host", "")), str(m["addr"]),
                                      int(m["nproc"]), int(m["rank_offset"])))
            offset += members[-1].nproc
        plan = Plan(int(obj["round"]), tuple(members), str(obj["master_addr"]), int(obj["master_port"]),
                    int(obj["restart_count"]), int(obj.get("max_restarts", 0)), mod_revision,
                    str(obj.get("leader") or ""))
    except (TypeError, ValueError, KeyError) as exc:
        raise BadKeyData(key, f"bad plan: {exc!r}") from exc
    if [m.group_rank for m in plan.members] != list(range(len(plan.members))):
        raise BadKeyData(key, "bad plan: members are not in group-rank order 0..n-1")
    return plan
