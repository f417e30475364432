"""Keys nothing should hold under a job's prefix, as one agent meets them: a key the schema does not name
(``nodes/x/y``, ``r/<N>/exit/a/b``), a registry entry without a lease, an exit key or failure report of a node outside
its round's plan. Each is ignored, with one warning per agent that reads it, and never stalls, restarts or ends the
job. A restart's guard requires the round to have no key at all under its exits, so the ones there that are no
member's exit are handed to the coordinator to delete (``ghost_exits``). Pure: no I/O. Imports ``errors``,
``schema.keys`` and ``coord.mirror`` only.
"""

from __future__ import annotations

from ..errors import BadKeyData
from ..schema.keys import Keys
from ..schema.values import Plan
from .mirror import Mirror


class Strays:
    """The stray keys one agent has warned about, judged against its mirror (whose plans say who is a member)."""

    def __init__(self, keys: Keys, mirror: Mirror, log):
        self.keys = keys
        self.mirror = mirror
        self.log = log
        self.said: set[str] = set()

    def note(self, kvs) -> None:
        """Warn, once each, about the keys among ``kvs`` (just read or just written) that nothing should hold."""
        for kv in kvs:
            if kv.key not in self.said:
                why = self.why(kv)
                if why:
                    self.say(kv.key, why)

    def say(self, key: str, why: str = "not a key of the etcd-agent schema") -> None:
        """A key under the job's prefix that nothing should read: say so once, and ignore it."""
        if key not in self.said:
            self.said.add(key)
            self.log.warning("ignoring %s: %s (delete it with etcdctl del)", key, why)

    def why(self, kv) -> str | None:
        """Why nothing should hold ``kv`` (None: it is a key of the job, or its round's plan is not known here)."""
        if not kv.key.startswith(self.keys.prefix):
            return None  # outside the job (the cluster-wide quarantine record): its reader validates it
        try:
            parsed = self.keys.parse(kv.key)
        except BadKeyData:
            return "not a key of the etcd-agent schema"
        if parsed.kind == "node" and not kv.lease:
            return "a registry entry without a lease is no live agent's"
        if parsed.kind not in ("exit", "failure"):
            return None
        try:
            plan = self.mirror.plan(parsed.round)
        except BadKeyData:
            return None  # the plan's own bad value is reported where it is read
        if plan is None or not plan.outside(parsed.node):  # a member's, or not known from the parts held here
            return None
        what = "an exit key" if parsed.kind == "exit" else "a failure report"
        return f"{what} of a node outside round {parsed.round}'s plan"

    def ghost_exits(self, plan: Plan) -> list:
        """The KVs under the round's exits (as far as the mirror holds them) that are no member's exit: an exit key
        of a node outside ``plan``, or anything below the exits (``exit/a/b``); each is warned about once."""
        ghosts = []
        for kv in self.mirror.under(self.keys.exits(plan.round)):
            why = self.why(kv)
            if why:
                self.say(kv.key, why)
                ghosts.append(kv)
        return ghosts
