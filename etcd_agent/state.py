"""The job's state as this agent sees it: a mirror of every key under the prefix, and typed views of it.

The mirror is filled by one read of the prefix and then kept current by the watch from that read's revision + 1
("read, then watch"), so deciding never needs another read. Events at or below the mirror's revision are ignored,
which makes replays after a resumed watch harmless. Records parse the JSON values; a value that does not fit the
schema raises BadKeyData naming the key. Pure: no I/O. Imports keys, errors and the KV record only.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from .errors import BadKeyData
from .keys import Keys, decode, require

JOINING, RUNNING, DONE, FAILED, STOPPED = "joining", "running", "done", "failed", "stopped"
PHASES = (JOINING, RUNNING, DONE, FAILED, STOPPED)
FINAL_PHASES = (DONE, FAILED, STOPPED)


@dataclasses.dataclass(frozen=True)
class RoundInfo:
    number: int
    phase: str
    reason: str
    mod_revision: int


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


@dataclasses.dataclass(frozen=True)
class Member:
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

    @property
    def world_size(self) -> int:
        return sum(m.nproc for m in self.members)

    def member(self, node: str) -> Member | None:
        return next((m for m in self.members if m.node == node), None)

    @property
    def nodes(self) -> list[str]:
        return [m.node for m in self.members]

    def to_json(self) -> dict:
        return {"round": self.round, "world_size": self.world_size, "group_world_size": len(self.members),
                "master_addr": self.master_addr, "master_port": self.master_port,
                "restart_count": self.restart_count, "max_restarts": self.max_restarts,
                "members": [dataclasses.asdict(m) for m in self.members]}


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


class Mirror:
    """Every KV under the job prefix, kept current by watch events.

    A view is built after every delivery, so what it parses is remembered per KV object (a KV is replaced, never
    changed, when its key changes): building a view costs O(keys) string work, and JSON decoding only for the keys
    that changed since the last view, not for every record of the job again.
    """

    def __init__(self, keys: Keys):
        self.keys = keys
        self.kvs: dict[str, object] = {}
        self.revision = 0
        self._memo: dict[tuple, tuple[object, object]] = {}  # (key, what) -> (the KV it was made from, result)

    def reset(self, kvs: Iterable, revision: int) -> None:
        self.kvs = {kv.key: kv for kv in kvs}
        self.revision = revision
        self._memo.clear()

    def _remembered(self, kv, what, make):
        """``make(kv)``, computed once per KV object (errors are not remembered: they are raised again)."""
        slot = (kv.key, what)
        hit = self._memo.get(slot)
        if hit is not None and hit[0] is kv:
            return hit[1]
        result = make(kv)
        self._memo[slot] = (kv, result)
        return result

    def apply(self, events: Iterable) -> bool:
        """Apply one watch delivery (etcd never splits a revision across deliveries); returns whether any was new."""
        changed, base = False, self.revision
        for ev in events:
            if ev.kv.mod_revision <= base:
                continue  # replayed by a resumed watch, or already covered by a read
            if ev.kind == "delete":
                self.kvs.pop(ev.kv.key, None)
                for what in ("decode", "join", "parse", "plan"):
                    self._memo.pop((ev.kv.key, what), None)
            else:
                self.kvs[ev.kv.key] = ev.kv
            self.revision = ev.kv.mod_revision
            changed = True
        return changed

    def get(self, key: str):
        return self.kvs.get(key)

    def value(self, key: str, required: tuple[str, ...] = ()) -> dict | None:
        kv = self.kvs.get(key)
        if kv is None:
            return None
        return require(key, self._decoded(kv), required)

    def _decoded(self, kv) -> dict:
        return self._remembered(kv, "decode", lambda kv: decode(kv.key, kv.value))

    def under(self, prefix: str) -> list:
        return [kv for key, kv in self.kvs.items() if key.startswith(prefix)]

    def view(self) -> View:
        k = self.keys
        rnd = self.round()
        number = rnd.number if rnd else 0
        nodes = {kv.key[len(k.nodes()):]: self._decoded(kv) for kv in self.under(k.nodes())}
        joins = ({j.node: j for j in (self._remembered(kv, "join", parse_join) for kv in self.under(k.joins(number)))}
                 if rnd else {})
        exits = frozenset(kv.key[len(k.exits(number)):] for kv in self.under(k.exits(number))) if rnd else frozenset()
        failures = ({kv.key[len(k.failures(number)):]: self._decoded(kv) for kv in self.under(k.failures(number))}
                    if rnd else {})
        return View(self.revision, self.value(k.spec()), rnd, nodes, joins,
                    self.plan(number) if rnd else None, self.last_plan(number), exits, failures, self.restarts(), self.value(k.result()))

    def round(self) -> RoundInfo | None:
        key = self.keys.round()
        obj = self.value(key, ("round", "phase"))
        if obj is None:
            return None
        if not isinstance(obj["round"], int) or obj["round"] < 1 or obj["phase"] not in PHASES:
            raise BadKeyData(key, f"round must be a positive integer and phase one of {', '.join(PHASES)}")
        return RoundInfo(obj["round"], obj["phase"], str(obj.get("reason", "")), self.kvs[key].mod_revision)

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
        members = tuple(Member(str(m["node"]), int(m["group_rank"]), str(m.get("host", "")), str(m["addr"]),
                               int(m["nproc"]), int(m["rank_offset"])) for m in obj["members"])
        return Plan(int(obj["round"]), members, str(obj["master_addr"]), int(obj["master_port"]),
                    int(obj["restart_count"]), int(obj.get("max_restarts", 0)), mod_revision)
    except (TypeError, ValueError, KeyError) as exc:
        raise BadKeyData(key, f"bad plan: {exc!r}") from exc
