"""The job's state as this agent sees it: a mirror of the keys it reads and watches, and typed views of it.

Each range in the mirror is filled by one read and then kept current by a watch from that read's revision + 1
("read, then watch"), and by the read-backs of this agent's own txns, so deciding never needs another read. News
of a key at or below what the mirror holds for it (or below its last delete, or below a read that covered it) is
ignored, which makes replays after a resumed watch harmless. A ``Scope`` says what the mirror covers: the round's
leader sees the registry and the whole round, the others only their own keys and one peer's. Values are read as
the typed records of ``values.py``; a value that does not fit the schema raises BadKeyData naming the key. Pure:
no I/O. Imports ``schema/`` and ``errors`` only.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Iterable

from ..errors import BadKeyData
from ..schema.keys import ROUND_DIGITS, Keys, prefix_end
from ..schema.values import Failure, Join, NodeInfo, Phase, Plan, PlanPart, Restarts, Result, RoundInfo, SpecValue

JOINING, RUNNING, DONE, FAILED, STOPPED = Phase
FINAL_PHASES = tuple(p for p in Phase if p.final)  # one rule: Phase.final


@dataclasses.dataclass(frozen=True)
class View:
    """What decide() sees: the current round and everything it needs of the job."""

    revision: int
    spec: SpecValue | None
    round: RoundInfo | None
    nodes: dict[str, NodeInfo]
    joins: dict[str, Join]
    plan: Plan | None
    last_plan: Plan | None  # the newest plan of an earlier round: who ran before
    exits: frozenset[str]
    failures: dict[str, Failure]
    restarts: Restarts | None
    result: Result | None
    scope: Scope = None  # what the mirror covers (None: everything, as FULL)
    last_failures: dict[str, Failure] | None = None  # the last plan's round's reports (full views; None: not known)
    memo: dict | None = dataclasses.field(default=None, compare=False, repr=False)  # ``members``' (None: afresh)

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
    """The KVs under the job prefix that this agent reads and watches, kept current by watch events and own txns.

    Several watches over different ranges feed one mirror, so each key keeps its newest version: an event or txn
    result at or below what the mirror holds for that key, or below its last delete, is old news (replays of a
    resumed watch are harmless). A range is replaced as a whole by a read of it (``reset_range``).

    A view is built after every delivery, so what it parses is remembered per KV object (a KV is replaced, never
    changed, when its key changes), and what it makes of a directory (a plan's parts, a round's exits) is made again
    only when a key under it changed (its stamp), from the keys that changed since the last view.
    ``changes`` counts every change of the KVs held; a view asked for again with no change since is the last one.
    """

    def __init__(self, keys: Keys):
        self.keys = keys
        self.kvs: dict[str, object] = {}
        self.dirs: dict[str, dict[str, object]] = {}  # "a/b/" -> the KVs directly under it: a view reads dirs
        self.deleted: dict[str, int] = {}  # key -> revision of its newest delete seen
        self.revision = 0  # the newest revision seen anywhere (a read, an event, a txn)
        self.floors: dict[tuple[str, bytes], int] = {}  # range -> revision it was read at: older news is ignored
        self._memo: dict[tuple, tuple[object, object]] = {}  # (key, what) -> (the KV it was made from, result)
        self._plans: dict[int, tuple[object, int, Plan]] = {}  # round -> (its header's KV, _stamps of its parts, plan)
        self._stamps: dict[str, int] = {}  # directory -> a new number whenever a key directly under it changes
        self._stamper = itertools.count(1)  # (never 0: a directory not stamped since the last reset has 0)
        self._made: dict[str, tuple[int, object]] = {}  # directory -> (its stamp, what a view made of it)
        self._headers: set[str] = set()  # the keys held that may be plan headers (``last_plan`` looks at these only)
        # directory -> (kind, {key: (KV, record)}, what a view made of it): updated by the keys changed (``_dirty``)
        self._dir_cache: dict[str, tuple[type, dict, dict]] = {}
        self._dirty: dict[str, set[str]] = {}
        self.changes = 0  # bumped by every change of ``kvs``: what a view is made of
        self._view: tuple[int, Scope, View] | None = None  # (changes, scope, the view made then)
        self._members: dict = {}  # ``View.memo``: what ``members`` made of this mirror's views, kept across views

    def reset(self, kvs: Iterable, revision: int) -> None:
        """The whole mirror is a read of the whole prefix at ``revision``."""
        self.kvs = {kv.key: kv for kv in kvs}
        self.dirs = {}
        for kv in self.kvs.values():
            self.dirs.setdefault(_dir(kv.key), {})[kv.key] = kv
        self._headers = {key for key in self.kvs if key.endswith("/plan")}
        self.deleted.clear()
        self.floors = {(self.keys.prefix, prefix_end(self.keys.prefix)): revision}
        self.revision = max(self.revision, revision)
        for made in (self._memo, self._dir_cache, self._dirty, self._stamps, self._plans, self._made):
            made.clear()  # what was made of the KVs held before
        self.changes += 1

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

    def _touch(self, key: str) -> None:
        directory = _dir(key)
        self._stamps[directory] = next(self._stamper)
        if directory in self._dir_cache or directory in self._made:  # what was made of it is made again from these
            self._dirty.setdefault(directory, set()).add(key)

    def _drop(self, key: str) -> None:
        if self.kvs.pop(key, None) is not None:
            self.changes += 1
            self._headers.discard(key)
            self._touch(key)
            d = self.dirs.get(_dir(key))
            if d is not None:
                d.pop(key, None)
                if not d:
                    del self.dirs[_dir(key)]
        for what in ("record", "parse"):
            self._memo.pop((key, what), None)

    def _put(self, kv) -> bool:
        if self._old(kv.key, kv.mod_revision):
            return False
        cur = self.kvs.get(kv.key)
        if (cur is not None and cur.mod_revision >= kv.mod_revision) or self.deleted.get(kv.key, 0) >= kv.mod_revision:
            return False
        self.kvs[kv.key] = kv
        self.dirs.setdefault(_dir(kv.key), {})[kv.key] = kv
        if kv.key.endswith("/plan"):
            self._headers.add(kv.key)
        self.deleted.pop(kv.key, None)
        self._touch(kv.key)
        self.changes += 1
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
        plan (header and parts) and the failures of round ``keep_plan`` (who ran last: prev_rank, the fast path; who
        is blamed for it)."""
        keep = (self.keys.plan(keep_plan), self.keys.plan(keep_plan) + "/", self.keys.failures(keep_plan)) \
            if keep_plan else None

        def old(key: str) -> bool:
            rnd = self._round_of(key)
            return rnd is not None and rnd < before and not (
                keep and (key == keep[0] or key.startswith(keep[1]) or key.startswith(keep[2])))
        for key in [k for k in list(self.kvs) + list(self.deleted) if old(k)]:
            self._drop(key)
            self.deleted.pop(key, None)
        for rng in [rng for rng in self.floors if old(rng[0])]:
            del self.floors[rng]
        for directory in [d for d in self._dir_cache if old(d)]:
            del self._dir_cache[directory]
            self._dirty.pop(directory, None)
        for directory in [d for d in self._made if old(d)]:
            del self._made[directory]
            self._dirty.pop(directory, None)

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

    def record(self, kv, kind: type):
        """The typed record of ``kv`` (validated once per KV)."""
        return self._remembered(kv, "record", kind.from_kv)

    def record_at(self, key: str, kind: type):
        kv = self.kvs.get(key)
        return None if kv is None else self.record(kv, kind)

    def _derived(self, directory: str, kind: type, make: Callable[[dict], dict]) -> dict:
        """``make({key: (KV, record)})`` for the KVs directly under ``directory`` read as ``kind``: made again only
        when a key there changed, from the records of the changed keys and those kept (read-only: views share it).
        A bad value raises BadKeyData, as ``record`` does, and nothing is kept."""
        cached = self._dir_cache.pop(directory, None)
        present = self.dirs.get(directory, {})
        if cached is not None and cached[0] is kind:
            dirty = self._dirty.pop(directory, set())
            if not dirty:
                self._dir_cache[directory] = cached
                return cached[2]
            records = cached[1]
        else:
            self._dirty.pop(directory, None)
            records, dirty = {}, present.keys()
        for key in dirty:
            kv = present.get(key)
            if kv is not None:
                records[key] = (kv, self.record(kv, kind))
        records = {key: records[key] for key in present}  # in the mirror's order, as ``children`` gives them
        derived = make(records)
        self._dir_cache[directory] = (kind, records, derived)
        return derived

    def children(self, directory: str) -> list:
        """The KVs directly under ``directory`` (which ends with a slash): ``nodes/x`` but not ``nodes/x/y``."""
        return list(self.dirs.get(directory, {}).values())

    def under(self, prefix: str) -> list:
        return [kv for key, kv in self.kvs.items() if key.startswith(prefix)]

    def view(self, scope: Scope = FULL, revision: int | None = None) -> View:
        """The typed view; ``scope`` says what the mirror covers, ``revision`` through which revision the round's
        joins are known (default: the newest revision seen). The last view again when no KV changed since."""
        rev = self.revision if revision is None else revision
        last = self._view
        if last is not None and last[0] == self.changes and last[1] == scope:
            if last[2].revision != rev:
                last = self._view = (last[0], scope, dataclasses.replace(last[2], revision=rev))
            return last[2]
        view = self._make_view(scope, rev)
        self._view = (self.changes, scope, view)
        return view

    def _make_view(self, scope: Scope, revision: int) -> View:
        k = self.keys
        rnd = self.round()
        number = rnd.number if rnd else 0
        # a registry entry without a lease is no live agent's (every agent registers on its session's lease)
        cut = len(k.nodes())
        nodes = self._derived(k.nodes(), NodeInfo,
                              lambda got: {key[cut:]: info for key, (kv, info) in got.items() if kv.lease})
        joins = (self._derived(k.joins(number), Join, lambda got: {j.node: j for _kv, j in got.values()})
                 if rnd else {})
        where = k.exits(number)
        exits = self._names(where) if rnd else frozenset()
        plan = self.plan(number) if rnd else None
        last = self.last_plan(number) if rnd is None or rnd.last_plan is None else self.plan(rnd.last_plan)
        # a full view watches the last plan's round's failures too: who is blamed for it (``blame.py``)
        last_failures = self._member_failures(last) if scope.full and last is not None else None
        return View(revision, self.record_at(k.spec(), SpecValue), rnd, nodes, joins, plan, last, exits,
                    self._member_failures(plan), self.restarts(), self.record_at(k.result(), Result),
                    scope, last_failures, self._members)

    def _member_failures(self, plan: Plan | None) -> dict[str, Failure]:
        """The failure reports of the plan's members. A key under the round's failures of any other node (or below
        them, ``failures/a/b``) is no member's report: nothing decides on it, so its value is never read (a bad one
        must not hold the job). Of a plan held in part, a report is a member's unless a held part says otherwise."""
        if plan is None:
            return {}
        where = self.keys.failures(plan.round)
        return {kv.key[len(where):]: self.record(kv, Failure) for kv in self.children(where)
                if not plan.outside(kv.key[len(where):])}

    def _names(self, directory: str) -> frozenset[str]:
        """The names of the keys under ``directory``, updated by the keys changed since (a step costs its exits)."""
        stamp, hit, changed = self._stamps.get(directory, 0), self._made.get(directory), self._dirty.pop(directory, ())
        if hit is None or hit[0] != stamp:
            present, cut = self.dirs.get(directory, {}), len(directory)
            gone, came = [k[cut:] for k in changed if k not in present], [k[cut:] for k in changed if k in present]
            hit = self._made[directory] = (stamp, frozenset(key[cut:] for key in present) if hit is None
                                           else hit[1].difference(gone).union(came))
        return hit[1]

    def ended(self, scope: Scope = FULL) -> View | None:
        """A view of a job that has a result and nothing else (None while it has none): once the job has ended
        nothing else of it is decided, so a bad value in any other key never keeps an agent from seeing the end
        (``etcd-agent stop``)."""
        result = self.record_at(self.keys.result(), Result)
        if result is None:
            return None
        return View(self.revision, None, None, {}, {}, None, None, frozenset(), {}, None, result, scope)

    def round(self) -> RoundInfo | None:
        return self.record_at(self.keys.round(), RoundInfo)

    def restarts(self) -> Restarts | None:
        return self.record_at(self.keys.restarts(), Restarts)

    def last_plan(self, before: int) -> Plan | None:
        earlier = [p.round for p in (self._remembered(self.kvs[key], "parse", self.parse_key) for key in self._headers)
                   if p is not None and p.kind == "plan" and p.round < before]  # a header's key ends with /plan
        return self.plan(max(earlier)) if earlier else None

    def parse_key(self, kv):
        """The schema's reading of a key, or None for a key it does not name (ignored, never fatal)."""
        try:
            return self.keys.parse(kv.key)
        except BadKeyData:
            return None

    def plan(self, number: int) -> Plan | None:
        """Round ``number``'s plan: its header with whichever of its parts the mirror holds (all of them for a
        reader that read or watches the whole plan; a member's own part otherwise). None without a header. Made
        again only when one of those keys changed (the leader's view is built after every delivery)."""
        key = self.keys.plan(number)
        header = self.kvs.get(key)
        if header is None:
            return None
        stamp = self._stamps.get(key + "/", 0)
        hit = self._plans.get(number)
        if hit is not None and hit[0] is header and hit[1] == stamp:
            return hit[2]
        plan = self.record(header, Plan).with_parts(key, [self.record(kv, PlanPart) for kv in self.children(key + "/")
                                                          if self._part(kv)])
        self._plans[number] = (header, stamp, plan)
        if len(self._plans) > 3:  # a view needs the current plan and the last one
            del self._plans[min(self._plans)]
        return plan

    def _part(self, kv) -> bool:
        parsed = self._remembered(kv, "parse", self.parse_key)
        return parsed is not None and parsed.kind == "plan_part"
