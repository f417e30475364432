"""A c10d Store on etcd v3: ``EtcdStore``, a Python subclass of ``torch.distributed.Store``.

torchrun's ``etcd-v3`` rendezvous backend (``torch/rendezvous.py``) hands torch's elastic agent one of these per
round (keys under ``P/store/<round>/``); it also works on its own, for example as the store of
``init_process_group("gloo", store=EtcdStore("127.0.0.1:2379", "/my/job/"), ...)``. Each key of the store is one
etcd key, the store's prefix plus torch's key, so ``etcdctl get --prefix <prefix>`` shows them all.

Semantics are those of torch's ``TCPStore``:

- ``get``, ``wait`` and ``multi_get`` block until the keys exist, at most the timeout (``set_timeout``, or the
  ``timeout`` argument of ``wait``; zero means no limit), then raise ``torch.distributed.DistStoreError``.
  Waiting is a watch: the keys are read, and what is missing is watched from that read's revision + 1 (on one
  watch stream per store, shared by every waiter), never polled.
- ``add`` keeps a decimal counter (a missing key counts from 0) and returns the new value; ``append`` extends a
  value (or sets it); both are compare-and-swap loops on the key's mod_revision, so concurrent callers in any
  number of processes never lose an update.
- ``compare_set(key, expected, desired)``: a key holding ``expected`` is set to ``desired`` and ``desired`` is
  returned; a key holding something else is left and its value returned; a missing key is created with
  ``desired`` when ``expected`` is empty, otherwise ``expected`` is returned and nothing is written.
- ``num_keys`` is one more than the keys the store holds, as TCPStore counts its own init key; ``list_keys``
  lists the keys themselves.
- ``delete_key`` returns whether the key existed; ``check`` whether every key exists.
- Any number of keys: etcd takes at most 128 operations per txn (its default ``--max-txn-ops``) and 1.5 MiB per
  request (``--max-request-bytes``). ``multi_get``, ``wait`` and ``check`` read longer lists in txns of 128 reads,
  the later ones pinned to the first one's revision, so that they see one state of etcd (never a mix of two
  revisions; a revision compacted in between starts the read over); ``multi_set`` writes in txns of at most 128
  puts and 1 MiB, each atomic on its own.
- A key deleted by anyone but this store object (``etcdctl del``, a cleanup, another process's ``delete_key``)
  after ``since`` (by default: after the store's first call) ends every wait of the store that has to wait, at
  once (within the watch's latency), with ``DistStoreError`` naming the deleted key: a count or barrier on the
  store (torch's exit barrier counts with ``add``, then waits for its last member's key) cannot complete after
  that, and the wait would otherwise sit out its whole timeout. The store sees deletes through one watch that
  etcd filters to deletes only. Its own ``delete_key`` ends no wait, as in TCPStore.

Every etcd error leaves as ``DistStoreError`` naming the operation and the key. Imports torch (the agent never
imports this module), the base modules and ``etcd/`` (client, watch); never ``coord/``, ``node/`` or the agent.
"""

from __future__ import annotations

import datetime
import itertools
import queue
import threading
import time
from typing import Callable

import torch.distributed as dist

from .. import logs
from ..config import EtcdConfig
from ..endpoints import parse_endpoints
from ..errors import EtcdError, EtcdRequestError
from ..etcd.client import Etcd, absent, mod_is, op_delete, op_get, op_get_at, op_put, prefix_end, value_is
from ..etcd.watch import Resync, WatchStream

log = logs.get("etcd_agent.torch.store")
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
MAX_TXN_BYTES = 1024 * 1024  # keys and values per txn, under etcd's default --max-request-bytes (1.5 MiB)
_NO_TIMEOUT = datetime.timedelta(0)
_CLOSED = object()  # put into a waiter's queue when the store is closed
_DELETED = object()  # put into every waiter's queue when someone else deleted a key of the store
_DELETES = "deletes"  # the watch range of the store's deletes (a waiter's range is named by a number)
_COMPACTED_RETRIES = 3  # reads started over when etcd compacted the revision a split read is pinned to


def _names(keys: list[str]) -> str:
    """Keys for a message: the first three, and how many there are when more."""
    shown = ", ".join(keys[:3])
    return shown if len(keys) <= 3 else f"{shown}, ... ({len(keys)} keys)"


def _batches(items: list[tuple[str, bytes]]):
    """``(key, value)`` pairs in runs that fit one txn: at most MAX_TXN_OPS, and at most MAX_TXN_BYTES unless one
    pair alone is larger (etcd then refuses it, naming its limit)."""
    batch: list[tuple[str, bytes]] = []
    size = 0
    for key, value in items:
        n = len(key.encode()) + len(value)
        if batch and (len(batch) == MAX_TXN_OPS or size + n > MAX_TXN_BYTES):
            yield batch
            batch, size = [], 0
        batch.append((key, value))
        size += n
    if batch:
        yield batch


def _as_bytes(value) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (list, tuple)):  # a std::vector<uint8_t> from C++
        return bytes(value)
    raise TypeError(f"a store value must be str or bytes, not {type(value).__name__}")


class EtcdStore(dist.Store):
    """torch's Store API on etcd keys under ``prefix`` (which must end with ``/``)."""

    def __init__(self, etcd: Etcd | EtcdConfig | str, prefix: str,
                 timeout: datetime.timedelta = datetime.timedelta(seconds=300),
                 on_add: Callable[[str, int], None] | None = None, since: int = 0):
        """``etcd``: a connection, its config, or ``HOST:PORT[,HOST:PORT...]`` (plaintext). ``on_add(key, value)``
        is called after every successful ``add`` (the rendezvous backend learns of torch's exit barrier so).
        ``since``: a revision from before the store's first key was written (the rendezvous backend gives the
        round's); a delete of a key after it ends the store's waits. 0: the revision of the store's first call."""
        super().__init__()
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"EtcdStore prefix {prefix!r}: must start and end with '/'")
        self._owned = not isinstance(etcd, Etcd)
        if isinstance(etcd, str):
            etcd = EtcdConfig(parse_endpoints(etcd, "EtcdStore endpoints"))
        self._etcd = Etcd(etcd) if isinstance(etcd, EtcdConfig) else etcd
        self.prefix = prefix
        self._on_add = on_add
        self.set_timeout(timeout)
        self._lock = threading.Lock()
        self._stream: WatchStream | None = None
        self._waiters: dict[str, queue.SimpleQueue] = {}
        self._names = itertools.count()
        self._closed = ""  # why the store was closed ('' while open)
        self._first = since  # deletes are watched from after it (0: the revision of the store's first answer)
        self._deleted: dict[str, int] = {}  # keys someone else deleted -> the revision they were deleted at
        self._deleting: dict[str, int] = {}  # keys this store is deleting now -> how many calls
        self._own_deletes: set[int] = set()  # revisions of this store's own deletes

    def __repr__(self) -> str:
        return f"EtcdStore({self._etcd.endpoints_text}, {self.prefix!r})"

    def close(self, reason: str = "the store was closed") -> None:
        """Stop the store's watch stream (and close its connection if the store made it); every wait in progress
        and every later call raises DistStoreError with ``reason``."""
        with self._lock:
            stream, self._stream = self._stream, None
            self._closed = self._closed or reason
            waiters = list(self._waiters.values())
        for q in waiters:
            q.put(_CLOSED)
        if stream is not None:
            stream.cancel(wait=False)
        if self._owned:
            self._etcd.close()

    # --- helpers -----------------------------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        if not isinstance(key, str):
            raise TypeError(f"a store key must be a str, not {type(key).__name__}")
        return self.prefix + key

    def _call(self, what: str, fn):
        if self._closed:
            raise dist.DistStoreError(f"etcd store {self.prefix}: {what}: {self._closed}")
        try:
            return fn()
        except EtcdError as exc:
            too_large = "request is too large" in str(exc) or "received message larger than max" in str(exc)
            hint = " (etcd takes at most --max-request-bytes per request, 1.5 MiB by default)" if too_large else ""
            raise dist.DistStoreError(f"etcd store {self.prefix}: {what}: {exc}{hint}") from exc

    def _opened(self, revision: int) -> None:
        if not self._first:
            self._first = revision

    def _seconds(self, timeout: datetime.timedelta | None) -> float | None:
        """Seconds to wait (None: no limit); torch's zero timeout means no limit."""
        t = self.timeout if timeout is None else timeout
        return None if t == _NO_TIMEOUT else t.total_seconds()

    def _read(self, what: str, keys: list[str]) -> tuple[dict[str, bytes], int]:
        """The keys among ``keys`` (torch's names) that exist, with their values, all as of one revision, and that
        revision: txns of at most MAX_TXN_OPS reads, the first fixing the revision the others read at."""
        full = [self._key(k) for k in keys]

        def read() -> tuple[dict[str, bytes], int]:
            for attempt in range(1, _COMPACTED_RETRIES + 1):
                found, revision = {}, 0
                try:
                    for start in range(0, len(full), MAX_TXN_OPS):
                        ops = [op_get_at(k, revision) for k in full[start:start + MAX_TXN_OPS]]
                        res = self._etcd.txn([], ops, where=f"store {what}")
                        revision = revision or res.revision
                        found.update((kv.key, kv.value) for r in res.ranges for kv in r)
                    return found, revision
                except EtcdRequestError as exc:  # the pinned revision was compacted meanwhile: read again
                    if "compacted" not in str(exc) or attempt == _COMPACTED_RETRIES:
                        raise
            raise AssertionError("unreachable")

        found, revision = self._call(f"{what} {_names(keys)}", read)
        self._opened(revision)
        return found, revision

    def _sink(self, name: str, _token: int, delivery) -> None:
        if name == _DELETES:
            self._note_deletes(delivery)
            return
        q = self._waiters.get(name)
        if q is not None:
            q.put(delivery)

    def _note_deletes(self, delivery) -> None:
        """The deletes watch delivered: remember the keys someone else deleted and wake every waiter."""
        if isinstance(delivery, Resync):
            return  # etcd compacted the revisions in between: their deletes are unknown
        with self._lock:
            first = not self._deleted
            new = [ev for ev in delivery if ev.kind == "delete" and ev.key not in self._deleted
                   and not self._deleting.get(ev.key) and ev.kv.mod_revision not in self._own_deletes]
            for ev in new:
                self._deleted[ev.key] = ev.kv.mod_revision
            waiters = {id(q): q for q in self._waiters.values()}.values() if new else []
        if new and first:
            log.warning("key %s of the etcd store %s was deleted at revision %d, not by this store; every wait on "
                        "the store now ends with an error instead of waiting out its timeout",
                        new[0].key[len(self.prefix):], self.prefix, new[0].kv.mod_revision)
        for q in waiters:
            q.put(_DELETED)

    def _check_deleted(self, missing: set[str]) -> None:
        if not self._deleted:
            return
        key, revision = next(iter(self._deleted.items()))
        raise dist.DistStoreError(
            f"etcd store {self.prefix}: wait for {_names(sorted(k[len(self.prefix):] for k in missing))}: the "
            f"store's key {key[len(self.prefix):]} was deleted at revision {revision}, not by this store (etcdctl, "
            "a cleanup or another process): a count or barrier on the store cannot complete after that, so the wait "
            "ends now instead of at its timeout")

    def _watch(self, missing: set[str], revision: int, deliveries: queue.SimpleQueue) -> list[str]:
        """Watch each of the ``missing`` keys from ``revision`` on the store's stream, and the store's deletes from
        its first revision; returns the names to remove when the wait ends."""
        names = []
        with self._lock:
            if self._closed:
                raise dist.DistStoreError(f"etcd store {self.prefix}: wait: {self._closed}")
            if self._stream is None:
                self._stream = WatchStream(self._etcd, self._sink, probe_interval=1.0,
                                           name=f"store-watch {self.prefix}").start()
                self._stream.add(_DELETES, self.prefix, prefix_end(self.prefix), (self._first or revision) + 1,
                                 deletes_only=True)
            for k in sorted(missing):
                name = f"{next(self._names)}"
                names.append(name)
                self._waiters[name] = deliveries
                self._stream.add(name, k, b"", revision + 1)
        return names

    def _await(self, keys: list[str], timeout: datetime.timedelta | None) -> dict[str, bytes]:
        """The values of ``keys`` (torch's names), waiting for the missing ones: read, then watch from the read."""
        found, revision = self._read("get", keys)
        missing = {self._key(k) for k in keys} - found.keys()
        if not missing:
            return found
        seconds = self._seconds(timeout)
        deadline = None if seconds is None else time.monotonic() + seconds
        deliveries: queue.SimpleQueue = queue.SimpleQueue()
        names = self._watch(missing, revision, deliveries)
        try:
            while missing:
                self._check_deleted(missing)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise dist.DistStoreError(
                        f"wait timeout after {int(seconds * 1000)}ms, keys: "
                        f"{', '.join(k[len(self.prefix):] for k in sorted(missing))} (etcd store {self.prefix})")
                try:
                    delivery = deliveries.get(timeout=left)
                except queue.Empty:
                    continue
                if delivery is _CLOSED:
                    raise dist.DistStoreError(f"etcd store {self.prefix}: wait for "
                                              f"{_names(sorted(k[len(self.prefix):] for k in missing))}: "
                                              f"{self._closed}")
                if delivery is _DELETED:
                    continue
                kvs = delivery.kvs if isinstance(delivery, Resync) else [ev.kv for ev in delivery if ev.kind == "put"]
                for kv in kvs:
                    if kv.key in missing:
                        found[kv.key] = kv.value
                        missing.discard(kv.key)
        finally:
            with self._lock:
                for name in names:
                    self._waiters.pop(name, None)
                    if self._stream is not None:
                        self._stream.remove(name)
        return found

    def _swap(self, what: str, key: str, change: Callable[[bytes | None], bytes]) -> bytes:
        """Compare-and-swap loop: write ``change(current)`` if the key did not move in between; returns it."""
        k = self._key(key)
        kv, revision = self._call(f"{what} {key}", lambda: self._etcd.get(k))
        self._opened(revision)
        while True:
            new = change(None if kv is None else kv.value)
            guard = mod_is(k, kv.mod_revision) if kv is not None else absent(k)
            res = self._call(f"{what} {key}", lambda: self._etcd.txn([guard], [op_put(k, new)], [op_get(k)],
                                                                   where=f"store {what}"))
            if res.succeeded:
                return new
            kv = res.ranges[0][0] if res.ranges[0] else None  # another writer won: try again on its value

    # --- the Store API -----------------------------------------------------------------------------------------
    def set(self, key: str, value) -> None:
        k, v = self._key(key), _as_bytes(value)
        self._opened(self._call(f"set {key}", lambda: self._etcd.put(k, v)))

    def get(self, key: str) -> bytes:
        return self._await([key], None)[self._key(key)]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        found = self._await(list(keys), None)
        return [found[self._key(k)] for k in keys]

    def multi_set(self, keys: list[str], values: list) -> None:
        if len(keys) != len(values):
            raise ValueError(f"multi_set: {len(keys)} key(s) but {len(values)} value(s)")
        for batch in _batches([(self._key(k), _as_bytes(v)) for k, v in zip(keys, values)]):
            ops = [op_put(k, v) for k, v in batch]
            res = self._call(f"multi_set {_names([k[len(self.prefix):] for k, _ in batch])}",
                             lambda: self._etcd.txn([], ops, where="store multi_set"))
            self._opened(res.revision)

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        self._await(list(keys), timeout)

    def check(self, keys: list[str]) -> bool:
        found, _revision = self._read("check", list(keys))
        return all(self._key(k) in found for k in keys)

    def add(self, key: str, amount: int) -> int:
        def change(current: bytes | None) -> bytes:
            try:
                return str(int(current or b"0") + int(amount)).encode()
            except ValueError:
                raise dist.DistStoreError(f"etcd store {self.prefix}: add {key}: the value {current!r} is not an "
                                          "integer") from None
        value = int(self._swap("add", key, change))
        if self._on_add is not None:
            self._on_add(key, value)
        return value

    def append(self, key: str, value) -> None:
        extra = _as_bytes(value)
        self._swap("append", key, lambda current: (current or b"") + extra)

    def compare_set(self, key: str, expected, desired) -> bytes:
        k, want, new = self._key(key), _as_bytes(expected), _as_bytes(desired)
        while True:
            res = self._call(f"compare_set {key}", lambda: self._etcd.txn(
                [value_is(k, want)], [op_put(k, new)], [op_get(k)], where="store compare_set"))
            if res.succeeded:
                return new
            if res.ranges[0]:
                return res.ranges[0][0].value
            if want:  # TCPStore: a missing key with a non-empty expectation is left missing
                return want
            res = self._call(f"compare_set {key}", lambda: self._etcd.txn(
                [absent(k)], [op_put(k, new)], [], where="store compare_set"))
            if res.succeeded:
                return new
            # created by someone else in between: compare against its value

    def delete_key(self, key: str) -> bool:
        """Deletes the key; this store's waits go on (the deletes watch knows the revision, or sees the key being
        deleted here)."""
        k = self._key(key)
        with self._lock:
            self._deleting[k] = self._deleting.get(k, 0) + 1
        try:
            res = self._call(f"delete_key {key}", lambda: self._etcd.txn([absent(k)], [], [op_delete(k)],
                                                                       where="store delete_key"))
            if not res.succeeded:  # the key was there and this txn deleted it, at res.revision
                with self._lock:
                    self._own_deletes.add(res.revision)
            return not res.succeeded
        finally:
            with self._lock:
                self._deleting[k] -= 1
                if not self._deleting[k]:
                    del self._deleting[k]

    def num_keys(self) -> int:
        end = prefix_end(self.prefix)
        return self._call("num_keys", lambda: self._etcd.count_range(self.prefix, end)) + 1

    def list_keys(self) -> list[str]:
        end = prefix_end(self.prefix)
        keys = self._call("list_keys", lambda: self._etcd.keys_in_range(self.prefix, end))
        return [k[len(self.prefix):] for k in keys]
