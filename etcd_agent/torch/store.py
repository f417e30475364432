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
- ``delete_key`` returns whether the key existed; ``check`` whether every key exists; ``multi_set`` writes its
  keys in one txn (etcd's limit of 128 operations per txn splits longer lists).

Every etcd error leaves as ``DistStoreError`` naming the operation and the key. Imports torch (the agent never
imports this module).
"""

from __future__ import annotations

import datetime
import itertools
import queue
import threading
import time
from typing import Callable

import torch.distributed as dist

from ..config import EtcdConfig, parse_endpoints
from ..errors import EtcdError
from ..etcd import Etcd, absent, mod_is, op_get, op_put, prefix_end, value_is
from ..watch import Resync, WatchStream

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
_NO_TIMEOUT = datetime.timedelta(0)
_CLOSED = object()  # put into a waiter's queue when the store is closed


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
                 on_add: Callable[[str, int], None] | None = None):
        """``etcd``: a connection, its config, or ``HOST:PORT[,HOST:PORT...]`` (plaintext). ``on_add(key, value)``
        is called after every successful ``add`` (the rendezvous backend learns of torch's exit barrier so)."""
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
            raise dist.DistStoreError(f"etcd store {self.prefix}: {what}: {exc}") from exc

    def _seconds(self, timeout: datetime.timedelta | None) -> float | None:
        """Seconds to wait (None: no limit); torch's zero timeout means no limit."""
        t = self.timeout if timeout is None else timeout
        return None if t == _NO_TIMEOUT else t.total_seconds()

    def _sink(self, name: str, _token: int, delivery) -> None:
        q = self._waiters.get(name)
        if q is not None:
            q.put(delivery)

    def _await(self, keys: list[str], timeout: datetime.timedelta | None) -> dict[str, bytes]:
        """The values of ``keys`` (store keys), waiting for the missing ones: read, then watch from the read."""
        full = [self._key(k) for k in keys]
        res = self._call(f"get {', '.join(keys)}",
                         lambda: self._etcd.txn([], [op_get(k) for k in full], where="store get"))
        found = {kv.key: kv.value for r in res.ranges for kv in r}
        missing = {k for k in full if k not in found}
        if not missing:
            return found
        seconds = self._seconds(timeout)
        deadline = None if seconds is None else time.monotonic() + seconds
        deliveries: queue.SimpleQueue = queue.SimpleQueue()
        names = []
        with self._lock:
            if self._closed:
                raise dist.DistStoreError(f"etcd store {self.prefix}: wait: {self._closed}")
            if self._stream is None:
                self._stream = WatchStream(self._etcd, self._sink, probe_interval=1.0,
                                           name=f"store-watch {self.prefix}").start()
            for k in sorted(missing):
                name = f"{next(self._names)}"
                names.append(name)
                self._waiters[name] = deliveries
                self._stream.add(name, k, b"", res.revision + 1)
        try:
            while missing:
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
                                              f"{', '.join(k[len(self.prefix):] for k in sorted(missing))}: "
                                              f"{self._closed}")
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
        kv, _rev = self._call(f"{what} {key}", lambda: self._etcd.get(k))
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
        self._call(f"set {key}", lambda: self._etcd.put(k, v))

    def get(self, key: str) -> bytes:
        return self._await([key], None)[self._key(key)]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        found = self._await(list(keys), None)
        return [found[self._key(k)] for k in keys]

    def multi_set(self, keys: list[str], values: list) -> None:
        if len(keys) != len(values):
            raise ValueError(f"multi_set: {len(keys)} key(s) but {len(values)} value(s)")
        ops = [op_put(self._key(k), _as_bytes(v)) for k, v in zip(keys, values)]
        for start in range(0, len(ops), MAX_TXN_OPS):
            chunk = ops[start:start + MAX_TXN_OPS]
            self._call(f"multi_set {', '.join(keys[start:start + 3])}...",
                       lambda: self._etcd.txn([], chunk, where="store multi_set"))

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        self._await(list(keys), timeout)

    def check(self, keys: list[str]) -> bool:
        full = [self._key(k) for k in keys]
        res = self._call(f"check {', '.join(keys)}",
                         lambda: self._etcd.txn([], [op_get(k) for k in full], where="store check"))
        return all(r for r in res.ranges)

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
        k = self._key(key)
        return self._call(f"delete_key {key}", lambda: self._etcd.delete_range(k)) > 0

    def num_keys(self) -> int:
        end = prefix_end(self.prefix)
        return self._call("num_keys", lambda: self._etcd.count_range(self.prefix, end)) + 1

    def list_keys(self) -> list[str]:
        end = prefix_end(self.prefix)
        keys = self._call("list_keys", lambda: self._etcd.keys_in_range(self.prefix, end))
        return [k[len(self.prefix):] for k in keys]
