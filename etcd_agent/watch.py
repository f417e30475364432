"""A resumable watch over one key range that never silently stops.

The library's own watcher thread dies without a sign after a stream break, so this module drives the Watch RPC
itself over the client's stub. Guarantees:
- Events arrive in revision order through ``sink``; after any stream error the watch resumes from the
  mod_revision of the last EVENT received + 1 (never the header's revision), so nothing is lost. A resumed
  watch can replay an event: consumers must be idempotent.
- When etcd has compacted the revision we need, the watch re-reads the range, hands the consumer a ``Resync``
  with that snapshot, and continues from the read's revision + 1.
- A stream that says nothing for three probe intervals (a frozen or partitioned member keeps the TCP socket
  open) is declared dead: the endpoint is marked failed so failover picks another member, and the watch resumes.
  Liveness comes from progress requests this side sends every interval (etcd >= 3.4) plus etcd's own
  progress notifications.
- ``sink`` runs on the watch thread: keep it non-blocking (push to a queue).
- ``wait_deleted`` waits for one key's delete (another holder's lease ending) on such a watch, never by polling.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Union

import grpc

from .errors import Compacted, EtcdError, WatchBroken
from .etcd import KV, Etcd, map_grpc_error, prefix_end, rpc

log = logging.getLogger("etcd_agent.watch")
_DELETE = 1  # mvccpb.Event.EventType.DELETE


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str  # "put" or "delete"
    kv: KV

    @property
    def key(self) -> str:
        return self.kv.key


@dataclasses.dataclass(frozen=True)
class Resync:
    """The watch lost its place (compaction): here is the whole range as of ``revision``."""

    kvs: list[KV]
    revision: int


Delivery = Union[list[Event], Resync]


class Watch:
    def __init__(self, etcd: Etcd, prefix: str, start_revision: int, sink: Callable[[Delivery], None],
                 probe_interval: float = 1.0, name: str = "watch", range_end: bytes | None = None):
        """Watch every key starting with ``prefix``, or, with ``range_end``, every key in ``[prefix, range_end)``."""
        self.etcd = etcd
        self.prefix = prefix
        self.range_end = prefix_end(prefix) if range_end is None else range_end
        self.next_revision = start_revision
        self.sink = sink
        self.probe_interval = probe_interval
        self.resumes = 0
        self._delivered = False  # the current stream answered at least once
        self._cancelled = threading.Event()
        self._call = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Watch":
        self._thread.start()
        return self

    def cancel(self, wait: bool = True) -> None:
        """Stop the watch; with ``wait``, until its thread has ended (otherwise a delivery may still follow)."""
        self._cancelled.set()
        call = self._call
        if call is not None:
            call.cancel()
        if wait and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.05
        while not self._cancelled.is_set():
            try:
                self._stream()
            except Compacted as exc:
                log.warning("watch on %s: revision %d was compacted (oldest %d); re-reading the range",
                            self.prefix, self.next_revision, exc.compact_revision)
                if not self._resync():
                    continue
            except Exception as exc:  # noqa: BLE001 - whatever broke the stream, this thread must not die
                if self._cancelled.is_set():
                    return
                self.resumes += 1
                if not isinstance(exc, (WatchBroken, EtcdError)):
                    log.exception("watch on %s failed unexpectedly; resuming", self.prefix)
                log.info("watch on %s broke (%s); resuming from revision %d", self.prefix, exc, self.next_revision)
                if self._delivered:
                    backoff, self._delivered = 0.05, False  # it was healthy: the first retry is quick again
                self._cancelled.wait(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05

    def _resync(self) -> bool:
        try:
            kvs, rev = self.etcd.get_range(self.prefix, self.range_end, deadline=5.0)
        except EtcdError as exc:
            log.warning("watch on %s could not re-read the range: %s", self.prefix, exc)
            self._cancelled.wait(0.2)
            return False
        self.next_revision = rev + 1
        self.sink(Resync(kvs, rev))
        return True

    def _stream(self) -> None:
        requests: queue.Queue = queue.Queue()
        create = rpc.WatchCreateRequest(key=self.prefix.encode(), range_end=self.range_end,
                                        start_revision=self.next_revision, progress_notify=True)
        requests.put(rpc.WatchRequest(create_request=create))
        channel, auth = self.etcd.channel_and_auth()
        stub = rpc.WatchStub(channel)

        def request_iter():
            while True:
                item = requests.get()
                if item is None:
                    return
                yield item

        call = stub.Watch(request_iter(), **auth)
        self._call = call
        last_seen = [time.monotonic()]
        silent = threading.Event()
        done = threading.Event()
        probe = threading.Thread(target=self._probe, args=(call, requests, last_seen, silent, done),
                                 name="watch-probe", daemon=True)
        probe.start()
        try:
            for resp in call:
                last_seen[0] = time.monotonic()
                self._delivered = True
                self._handle(resp)
            raise WatchBroken("the stream ended")
        except grpc.RpcError as exc:
            if silent.is_set():
                self.etcd.mark_failed()
                raise WatchBroken(f"no answer for {3 * self.probe_interval:.1f} s") from exc
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.etcd.mark_failed()
            raise map_grpc_error(exc, f"watch {self.prefix}") from exc
        finally:
            done.set()
            requests.put(None)
            self._call = None
            call.cancel()

    def _probe(self, call, requests: queue.Queue, last_seen: list, silent: threading.Event,
               done: threading.Event) -> None:
        """Ask for progress every interval; cancel the stream when it has been silent for three."""
        while not done.wait(self.probe_interval):
            if time.monotonic() - last_seen[0] > 3 * self.probe_interval:
                silent.set()
                call.cancel()
                return
            requests.put(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))

    def _handle(self, resp) -> None:
        if resp.compact_revision:
            raise Compacted(resp.compact_revision)
        if resp.canceled:
            raise WatchBroken(f"etcd canceled the watch: {resp.cancel_reason or 'no reason given'}")
        if not resp.events:
            # Created, or a progress notification. Its revision is never taken as "every event up to here was
            # delivered": on etcd 3.4.23 a requested progress notification can overtake events still in the
            # stream (etcd issue 15220; measured here), so the stream's liveness is all it proves.
            return
        events = [Event("delete" if ev.type == _DELETE else "put", KV.from_pb(ev.kv))
                  for ev in resp.events]
        self.next_revision = events[-1].kv.mod_revision + 1
        self.sink(events)


def wait_deleted(etcd: Etcd, key: str, revision: int, timeout: float, probe_interval: float = 1.0) -> bool:
    """Wait at most ``timeout`` seconds for ``key``, read as present at ``revision``, to be deleted; True when it
    was. The second half of "read, then watch from the read's revision + 1": a delete after the read is never
    missed. A re-read after a compaction that no longer finds the key counts as the delete."""
    deliveries: queue.SimpleQueue = queue.SimpleQueue()
    watch = Watch(etcd, key, revision + 1, deliveries.put, probe_interval=probe_interval,
                  name=f"wait-deleted-{key}").start()
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                batch = deliveries.get(timeout=left)
            except queue.Empty:
                return False
            if isinstance(batch, Resync):
                if all(kv.key != key for kv in batch.kvs):
                    return True
            elif any(ev.key == key and ev.kind == "delete" for ev in batch):  # the range also covers key + suffix
                return True
        return False
    finally:
        watch.cancel()
