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
from ..etcd.client import Etcd, prefix_end
from ..schema.keys import Keys
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
        self._opened = (0, 0)  # (round, revision it opened at): every join key of that round was created after

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
        Reads here are one key or one range each; the plan is read once per round. ``lease``: this agent's session;
        ``unhealthy``: it does not join (its health check failed); ``awaiting``: its failure restarted the job and
        may be a lost node's (it watches as a leader does until that is known)."""
        m, k = self.mirror, self.keys
        r = m.round()
        if r is not None and r.number != self._round:
            self._round = r.number
            m.prune(r.number, r.last_plan)
        if r is None or r.phase in FINAL_PHASES or m.get(k.result()) is not None:
            self._role(False)
            return
        n = r.number
        if r.last_plan and m.get(k.plan(r.last_plan)) is None:
            self.read_key(k.plan(r.last_plan))  # who ran last: this node's prev_rank, the leader's fast path
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
        plan = m.plan(n)
        if plan is None:
            self.read_key(k.plan(n))
            plan = m.plan(n)
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

    def read_key(self, key: str) -> None:
        """Read ``key`` once into the mirror."""
        kv, rev = self.etcd.get(key)
        self.mirror.reset_range(key, b"", [kv] if kv else [], rev)

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
            if self.leaders[rnd] != self.node:  # watch it from this read on: its vanishing is never missed
                self.watches.ensure("peer", first.key, b"", ([first], revision))
        else:
            self.leaders.pop(rnd, None)

    def _kind(self, key: str) -> str | None:
        try:
            return self.keys.parse(key).kind
        except BadKeyData:
            return None
