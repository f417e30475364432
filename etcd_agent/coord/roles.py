"""Who watches what: the ranges an agent watches for its role in the current round, so that every write costs
O(1) watch events per agent that it concerns instead of every write of the job (see ``Roles.maintain``).

Invariants: every loss of a member is seen by the round's leader and by its successor in rank order (a ring); a
joiner that does not lead watches the leader's join key and leads next if it vanishes; what is not watched is never
read as a fact (``View.scope``). A round's leader is known from a read of the oldest keys under its joins (or the
join txn's own read); keys planted below the joins are ignored with a warning.

Imports ``errors``, ``etcd.client``, ``schema.keys`` and ``coord/`` (``mirror``, ``strays``, ``txns``, ``watches``);
never ``node/`` or the agent.
"""

from __future__ import annotations

from . import txns
from ..errors import BadKeyData
from ..etcd.client import Etcd, op_get, prefix_end
from ..schema.keys import Keys
from ..schema.plan import Plan, part_of
from .mirror import FINAL_PHASES, JOINING, Mirror, Scope
from .strays import Strays
from .watches import Watches


class Roles:
    """One agent's watches for its role, and the leaders it knows."""

    def __init__(self, etcd: Etcd, keys: Keys, node: str, mirror: Mirror, watches: Watches, strays: Strays):
        self.etcd, self.keys, self.node, self.mirror = etcd, keys, node, mirror
        self.watches, self.strays = watches, strays
        self.scope = Scope(False)  # what the mirror covers, set by ``maintain``
        self.leaders: dict[int, str] = {}  # round -> its leader, as this agent's join txn (or a re-read) found
        self._round = 0
        self._plans_read: set[tuple[int, bool]] = set()  # (round, whole) of the plan reads made
        self._opened = (0, 0)  # (round, revision it opened at): every join key of that round was created after
        self._leaders_told = 0  # bumped whenever ``leaders`` changes
        self._settled: tuple | None = None  # what ``maintain`` last found with nothing left to do (``_inputs``)
        self._missing = False  # this ``maintain`` read a plan that was not there
        self._placed: tuple | None = None  # ``_role``'s arguments and the watches it left (``_placing``)

    def maintain(self, lease: int, unhealthy: bool, awaiting: bool) -> None:
        """Watch what this agent's role in the current round needs, before it decides (O(1) watch events per
        write that concerns it, instead of every write of the job):

        - every agent: the job-wide keys (round, restarts, result, spec), and its own keys through its txns;
        - the round's leader (the joiner with the lowest create revision while joining; the plan's ``leader``
          while running): the registry and every key of the round (joins, exits, failures);
        - a joiner that does not lead: the leader's join key (it leads next if that key vanishes);
        - an unhealthy node that does not join a forming round: the registry and every key of the round, as the
          leader does (if nobody joins by the join timeout, it ends the job; the timeout names the unhealthy nodes);
        - a member that does not lead: the join key of its predecessor in rank order (a ring), so every member's
          loss is seen by its successor and by the leader.
        Reads here are one key or one range each; a member reads the header and its own part of the plan once per
        round (``read_plan``), the leader the whole plan. ``lease``: this agent's session;
        ``unhealthy``: it does not join (its health check failed); ``awaiting``: its failure restarted the job and
        may be a lost node's (it watches as a leader does until that is known).

        Run before every decision, so a call whose inputs (the mirror's KVs, the arguments, the leaders known,
        whether the peer's key is known) are those a call that changed nothing ended with does nothing again."""
        before = self._inputs(lease, unhealthy, awaiting)
        if before == self._settled:
            return
        self._missing = False
        self._maintain(lease, unhealthy, awaiting)
        after = self._inputs(lease, unhealthy, awaiting)
        # a call that changed something runs once more, and one that found a plan missing reads it again
        self._settled = after if after == before and not self._missing else None

    def news(self) -> object:
        """What a watch delivery can change of what the next decision reads: the mirror's KVs, whether the peer's
        key is known, the leader's view revision; never equal while ``maintain`` has something left to do. Equal
        before and after a wake: the wake changed nothing decided on (old news, a replay), so the agent waits on."""
        if self._settled is None:
            return object()  # never equal: the next step runs
        known = self.watches.known
        return self.mirror.changes, "peer" in known, known.get("round") if self.scope.full else None

    def _inputs(self, lease: int, unhealthy: bool, awaiting: bool) -> tuple:
        return (self.mirror.changes, lease, unhealthy, awaiting, self._leaders_told, "peer" in self.watches.known,
                self.watches.watched("peer"))

    def _maintain(self, lease: int, unhealthy: bool, awaiting: bool) -> None:
        m, k = self.mirror, self.keys
        r = m.round()
        if r is not None and r.number != self._round:
            self._round = r.number
            m.prune(r.number, r.last_plan)
        if r is None or r.phase in FINAL_PHASES or m.get(k.result()) is not None:
            self._role(False)
            return
        self._role_for(r, m, k, lease, unhealthy, awaiting)
        if r.last_plan:  # who ran last: this node's prev_rank; all of it for a full view (the fast path, blame)
            self.read_plan(r.last_plan, None, whole=self.scope.full)

    def _role_for(self, r, m: Mirror, k: Keys, lease: int, unhealthy: bool, awaiting: bool) -> None:
        n = r.number
        if r.phase == JOINING:
            self._opened = (n, r.mod_revision)  # only the bump (or the job's start) writes a joining round
            mine = m.get(k.join(n, self.node))
            if mine is None or mine.lease != lease:
                # Not joined yet: the join txn tells who leads. An unhealthy node watches the registry and the round
                # (it fails the job if nobody joins by the join timeout, naming the unhealthy nodes).
                self._role(unhealthy or awaiting, n)
                return
            for _ in range(3):
                leader = self.leaders.get(n)
                if leader == self.node:
                    self._role(True, n)
                    return
                if leader is not None and m.get(k.join(n, leader)) is not None:
                    self._role(False, peer=k.join(n, leader))
                    return
                self._find_leader(n)  # the leader's key vanished (or is not known): who leads now?
            return
        plan = self.read_plan(n, r.plan_parts)
        if plan is not None and not plan.complete and len(m.children(k.exits(n))) >= plan.group_world_size:
            # this node's exit txn read back as many exits as the plan has members: the last to finish ends the
            # job once the whole plan says they are all members' (the exit barrier; O(N) bytes for the last ones)
            plan = self.read_plan(n, None, whole=True)
        if plan is None or plan.member(self.node) is None:
            self._role(awaiting, n)
        elif plan.leader_node == self.node:
            self._role(True, n)
        else:
            pred = plan.predecessor(self.node)
            # the predecessor joined after the round opened: its key's whole life replays from there, unread
            since = self._opened[1] + 1 if self._opened[0] == n else None
            self._role(False, peer=k.join(n, pred) if pred else None, since=since)

    def _role(self, full: bool, rnd: int = 0, peer: str | None = None, since: int | None = None) -> None:
        k = self.keys
        r = self.mirror.round()
        placing = self._placing(full, rnd, peer, since, r)
        if placing == self._placed:
            return  # the same role as the last call left in place: each watch is as it was, the scope too
        if full:
            self.watches.unwatch("peer")
            self.watches.ensure("registry", k.nodes(), prefix_end(k.nodes()))
            self.watches.ensure("round", k.round_dir(rnd), prefix_end(k.round_dir(rnd)))
            if r is not None and r.last_plan:  # who is blamed for the last round (``blame.py``)
                self.watches.ensure("blame", k.failures(r.last_plan), prefix_end(k.failures(r.last_plan)))
        else:
            self.watches.unwatch("registry")
            self.watches.unwatch("round")
            self.watches.unwatch("blame")
            if peer is None:
                self.watches.unwatch("peer")
            elif since is None:
                self.watches.ensure("peer", peer, b"")
            else:
                self.watches.follow("peer", peer, since)
        # a peer whose key was not read yet, nor replayed, is not watched yet: its absence is no loss
        known = not full and peer is not None and "peer" in self.watches.known
        self.scope = Scope(full, frozenset({peer.rsplit("/", 1)[1]}) if known else frozenset())
        self._placed = self._placing(full, rnd, peer, since, r)

    def _placing(self, full: bool, rnd: int, peer: str | None, since: int | None, r) -> tuple:
        """What ``_role`` decides on: its arguments, the last plan's round (a full role watches its failures),
        the watched ranges and whether the peer's key is known; equal to what the last call left, it does nothing."""
        w = self.watches
        return (full, rnd, peer, since, r.last_plan if full and r is not None else None, "peer" in w.known,
                w.watched("registry"), w.watched("round"), w.watched("blame"), w.watched("peer"))

    def read_key(self, key: str) -> None:
        """Read ``key`` once into the mirror."""
        kv, rev = self.etcd.get(key)
        self.mirror.reset_range(key, b"", [kv] if kv else [], rev)

    def read_plan(self, rnd: int, parts: int | None, whole: bool = False) -> Plan | None:
        """Round ``rnd``'s plan, read into the mirror unless it holds enough of it already: this node's part (its
        ranks, its predecessor; or that it is no member), or with ``whole`` every part. A member reads the header
        and its own part in one txn of two gets when ``parts`` (the round's ``plan_parts``) says how many there
        are; else the header first (an older plan holds every member in it), then the part: O(1) bytes per member
        and round either way. ``whole``: one read of the plan's range (the leader's view, O(N) bytes)."""
        m = self.mirror
        plan = m.plan(rnd)
        mine = plan is not None and (plan.member(self.node) is not None or plan.outside(self.node))
        enough = plan is not None and (plan.complete or (not whole and mine))
        if enough or (rnd, whole) in self._plans_read:  # read already: a part that is missing is bad data, not news
            return plan
        plan = self._read_plan(rnd, parts, whole, plan)
        if plan is not None:  # (a plan not there yet is read again next time)
            self._plans_read = {(n, w) for n, w in self._plans_read if n >= rnd - 2} | {(rnd, whole)}
        else:
            self._missing = True
        return plan

    def _read_plan(self, rnd: int, parts: int | None, whole: bool, plan: Plan | None) -> Plan | None:
        m, k = self.mirror, self.keys
        if whole:
            kvs, rev = self.etcd.get_prefix(k.plan(rnd))
            m.reset_range(k.plan(rnd), prefix_end(k.plan(rnd)), kvs, rev)
            return m.plan(rnd)
        if plan is None and not parts:
            self.read_key(k.plan(rnd))
            plan = m.plan(rnd)
            if plan is None or plan.complete:
                return plan
        count = parts or plan.parts
        keys = ([] if plan is not None else [k.plan(rnd)]) + [k.plan_part(rnd, part_of(self.node, count))]
        res = self.etcd.txn([], [op_get(key) for key in keys], where=f"read round {rnd}'s plan")
        for key, kvs in zip(keys, res.ranges):
            m.reset_range(key, b"", kvs, res.revision)
        return m.plan(rnd)

    def _find_leader(self, rnd: int) -> None:
        res = txns.leader(self.etcd, self.keys, rnd)
        self.take_leader(rnd, res.ranges[0], res.revision)

    def take_leader(self, rnd: int, oldest: list, revision: int) -> None:
        """The round's leader, from a read of the oldest keys under its joins: the first that is a join key (keys
        planted below the joins are not, and are ignored with a warning)."""
        first = None
        for kv in oldest:
            if self._kind(kv.key) == "join":
                first = kv
                break
            self.strays.say(kv.key)
        if first is not None:
            self.mirror.absorb([first], revision)
            self.leaders[rnd] = first.key.rsplit("/", 1)[1]
            self._leaders_told += 1
            if self.leaders[rnd] != self.node:  # watch it from this read on: its vanishing is never missed
                self.watches.ensure("peer", first.key, b"", ([first], revision))
        else:
            self.leaders.pop(rnd, None)
            self._leaders_told += 1

    def _kind(self, key: str) -> str | None:
        try:
            return self.keys.parse(key).kind
        except BadKeyData:
            return None
