"""The key ranges one agent watches, on one multiplexed watch stream, and how their deliveries reach its mirror.

Guarantees:

- Read, then watch: ``ensure`` reads a range (or takes a read a txn made), puts it into the mirror and watches it from
  that read's revision + 1, so no change is missed. What was watched under the same name before is dropped first.
- A delivery reaches the owner as a ``WatchDelivery`` through ``sink`` (on the stream's thread); the owner applies it
  with ``apply`` on its own thread. A delivery of a range no longer watched (an old token) is no news and is dropped.
- Or replay, then watch: ``follow`` watches one key from an older revision without reading it; etcd replays what
  happened to the key since, and until that first delivery the key is not known (``known`` has no entry for it).
- ``known[name]`` is the revision through which that range is known (the leader's close guard uses the round's).

Imports ``etcd/`` (client, watch), ``schema.keys`` and the rest of ``coord/`` (mirror, strays); never ``node/`` or
the agent.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from ..errors import EtcdUnavailable
from ..etcd.client import Etcd
from ..etcd.watch import Resync, WatchStream
from .mirror import Mirror
from .strays import Strays


@dataclasses.dataclass(frozen=True)
class WatchDelivery:
    """What the watch of range ``name`` (watched under ``token``) delivered: events, or a ``Resync``."""

    name: str
    token: int
    delivery: object


class Watches:
    """Named ranges on one stream, feeding one mirror."""

    def __init__(self, etcd: Etcd, mirror: Mirror, strays: Strays, sink: Callable[[WatchDelivery], None],
                 probe_interval: float, thread_name: str, own: Callable[[str], bool]):
        """``own(key)``: keys the mirror keeps whatever is watched (this node's own, the plans)."""
        self.etcd, self.mirror, self.strays = etcd, mirror, strays
        self._sink = sink
        self._probe, self._thread_name, self._own = probe_interval, thread_name, own
        self.stream: WatchStream | None = None  # started with the first range
        self._ranges: dict[str, tuple[int, str, bytes]] = {}  # name -> (token of the stream's range, start, end)
        self.known: dict[str, int] = {}  # name -> revision through which that range is known

    def ensure(self, name: str, start: str, end: bytes, snapshot: tuple[list, int] | None = None) -> None:
        """Watch ``[start, end)`` under ``name`` (an empty ``end``: the one key ``start``): read it (or take
        ``snapshot``, a read made by a txn), put it into the mirror, and watch from that read's revision + 1."""
        current = self._ranges.get(name)
        if current is not None and current[1:] == (start, end):
            return
        if current is not None:
            self.unwatch(name)
        kvs, rev = snapshot if snapshot is not None else self.etcd.get_range(start, end)
        self.mirror.reset_range(start, end, kvs, rev)
        self.strays.note(kvs)
        self.known[name] = rev
        self._start()
        self._ranges[name] = (self.stream.add(name, start, end, rev + 1), start, end)

    def follow(self, name: str, key: str, since: int) -> None:
        """Watch the one key ``key`` under ``name`` from revision ``since`` without reading it first: etcd replays
        every change of the key from ``since`` on (from its creation, when ``since`` is older), and the first
        delivery makes it known (``known[name]``); a compacted ``since`` is read again by the stream (a ``Resync``).
        Saves the read where the key is known to have been created at or after ``since``."""
        current = self._ranges.get(name)
        if current is not None and current[1:] == (key, b""):
            return
        if current is not None:
            self.unwatch(name)
        self._start()
        self._ranges[name] = (self.stream.add(name, key, b"", since), key, b"")

    def _start(self) -> None:
        if self.stream is None:
            self.stream = WatchStream(self.etcd, lambda n, token, d: self._sink(WatchDelivery(n, token, d)),
                                      probe_interval=self._probe, name=self._thread_name).start()

    def unwatch(self, name: str, drop: bool = True) -> None:
        """Stop watching ``name`` and, when ``drop``, forget what only it kept current (``own`` keys stay)."""
        current = self._ranges.pop(name, None)
        if current is None:
            return
        _token, start, end = current
        self.stream.remove(name)
        self.known.pop(name, None)
        if drop:
            self.mirror.drop_range(start, end, keep=self._own)

    def watched(self, name: str) -> tuple[str, bytes] | None:
        """The range watched under ``name`` (None: none)."""
        current = self._ranges.get(name)
        return current[1:] if current is not None else None

    def watch_bad(self, key: str | None, prefix: str, log) -> bool:
        """Watch ``key``, whose bad value holds this agent (None: nothing holds it any more), whatever its role
        watches: its repair or deletion always reaches the agent, also where the key was read only once (after a
        failed compare). True when the read that starts the watch found the key changed already (no event is
        coming then). The key stays in the mirror when the watch ends (another watch may cover it)."""
        if key is None or not key.startswith(prefix):
            self.unwatch("bad", drop=False)
            return False
        if self.watched("bad") != (key, b""):
            self.unwatch("bad", drop=False)
        before = self.mirror.get(key)
        try:
            self.ensure("bad", key, b"")
        except EtcdUnavailable as exc:
            log.warning("cannot watch %s yet, trying again: %s", key, exc)
            return True  # decide again: the key is read (and watched) again on the next hold
        return self.mirror.get(key) is not before

    def apply(self, item: WatchDelivery) -> None:
        """A watch delivery into the mirror; a delivery of a watch stopped since is no news."""
        current = self._ranges.get(item.name)
        if current is None or current[0] != item.token:
            return
        _w, start, end = current
        delivery = item.delivery
        if isinstance(delivery, Resync):
            self.mirror.reset_range(start, end, delivery.kvs, delivery.revision)
            self.strays.note(delivery.kvs)
            self.known[item.name] = delivery.revision
        else:
            self.mirror.apply(delivery)  # first: a plan in the same delivery tells whose exits and failures count
            self.strays.note(ev.kv for ev in delivery if ev.kind == "put")
            if delivery:
                self.known[item.name] = max(self.known.get(item.name, 0), delivery[-1].kv.mod_revision)

    def cancel(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
