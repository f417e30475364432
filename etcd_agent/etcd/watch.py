"""Resumable watches over key ranges that never silently stop.

The library's own watcher thread dies without a sign after a stream break, so this module drives the Watch RPC
itself over the client's stub. ``WatchStream`` carries several ranges on one stream (an agent changes what it
watches every round: that is a request on the open stream, not a new stream and its threads); ``Watch`` is one
range on a stream of its own. Guarantees, for each range:
- Events arrive in revision order through ``sink``; after any stream error the watch resumes from the
  mod_revision of the last EVENT received + 1 (never the header's revision), so nothing is lost. A resumed
  watch can replay an event: consumers must be idempotent.
- When etcd has compacted the revision we need, the watch re-reads the range, hands the consumer a ``Resync``
  with that snapshot, and continues from the read's revision + 1.
- A dead stream (a frozen or partitioned member keeps the TCP socket open) is found by the process's one prober
  (``liveness.py``): a silent stream is sent a progress request (etcd >= 3.4) when nothing was heard from its
  member for 2 probe intervals (a live member answers the session's keepalives every TTL/3 on the same channel) or
  when it itself was silent for 10 intervals, and one unanswered for 2 intervals declares it dead: the endpoint is
  marked failed so failover picks another member, and the watch resumes. An idle watch costs etcd a request every
  10 intervals, no thread of its own; a member that froze is found within 4 intervals of its last answer.
- The gRPC call runs on the process's one stream loop (``streams_loop.py``, grpc.aio), and its answers are handled
  there: ``sink`` (and ``on_progress``) run on the loop's thread, so keep them non-blocking (push to a queue). The
  stream's own thread only resumes a broken stream and re-reads a compacted range (idle, it waits on a queue
  without a timeout); gRPC's reader and request threads are gone.
- ``wait_deleted`` waits for one key's delete (another holder's lease ending) on such a watch, never by polling.

Imports grpc, the generated messages through ``etcd.client``, ``etcd.diagnose``, ``etcd.liveness``,
``etcd.streams_loop``, ``errors``, ``logs`` and ``metrics``; nothing above ``etcd/``.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Union

import grpc

from .. import logs, metrics
from ..errors import EtcdError, WatchBroken
from .client import KV, Etcd, prefix_end, rpc
from .diagnose import map_grpc_error
from .liveness import PROBER, Pulse
from .streams_loop import LOOP, Stream

log = logs.get("etcd_agent.etcd.watch")
_DELETE = 1  # mvccpb.Event.EventType.DELETE


def _stale_token(reason: str, with_user: bool) -> bool:
    """Whether etcd canceled a watch because its auth token went stale (an etcd restart forgets its simple tokens).
    etcd before 3.4.22 and 3.5.6 says "permission denied" for that (etcd issue 12385), so with a user that counts
    too: the next stream logs in again, and a user that really lacks the permission is refused at that login's
    first call."""
    return "invalid auth token" in reason or "code = Unauthenticated" in reason or \
        (with_user and "permission denied" in reason.lower())


class TokenRefused(WatchBroken):
    """etcd canceled a watch because it no longer knows our auth token (it restarted, or the token expired)."""


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


@dataclasses.dataclass(frozen=True)
class _End:
    """The end of a stream's answers: etcd's or gRPC's error (None: the stream ended, or was given up here)."""

    error: BaseException | None
    given_up: bool = False


class Watch:
    """One key range on a stream of its own (``WatchStream`` with one range): ``sink(delivery)`` gets its events,
    and a ``Resync`` after a compaction."""

    def __init__(self, etcd: Etcd, prefix: str, start_revision: int, sink: Callable[[Delivery], None],
                 probe_interval: float = 1.0, name: str = "watch", range_end: bytes | None = None,
                 on_progress: Callable[[int], None] | None = None):
        """Watch every key starting with ``prefix``, or, with ``range_end``, every key in ``[prefix, range_end)``;
        ``on_progress`` as in ``WatchStream``."""
        self.prefix = prefix
        self.range_end = prefix_end(prefix) if range_end is None else range_end
        self._stream = WatchStream(etcd, lambda _name, _token, delivery: sink(delivery), probe_interval, name,
                                   on_progress)
        self._stream.add("range", prefix, self.range_end, start_revision)

    @property
    def resumes(self) -> int:
        return self._stream.resumes

    def start(self) -> "Watch":
        self._stream.start()
        return self

    def cancel(self, wait: bool = True) -> None:
        """Stop the watch; with ``wait``, until its thread has ended and no delivery is under way (otherwise a delivery
        may still follow)."""
        self._stream.cancel(wait)


def wait_for(etcd: Etcd, prefix: str, revision: int, timeout: float, seen: Callable[[Delivery], bool],
             probe_interval: float = 1.0, name: str = "wait") -> bool:
    """Watch the keys under ``prefix`` from ``revision`` + 1 (the second half of "read, then watch from the read's
    revision + 1": nothing after the read is missed) for at most ``timeout`` seconds, until ``seen(delivery)``
    says what was waited for came; True when it did."""
    deliveries: queue.SimpleQueue = queue.SimpleQueue()
    watch = Watch(etcd, prefix, revision + 1, deliveries.put, probe_interval=probe_interval, name=name).start()
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                if seen(deliveries.get(timeout=left)):
                    return True
            except queue.Empty:
                return False
        return False
    finally:
        watch.cancel()


def wait_deleted(etcd: Etcd, key: str, revision: int, timeout: float, probe_interval: float = 1.0) -> bool:
    """Wait at most ``timeout`` seconds for ``key``, read as present at ``revision``, to be deleted; True when it
    was. A re-read after a compaction that no longer finds the key counts as the delete."""
    def deleted(batch: Delivery) -> bool:
        if isinstance(batch, Resync):
            return all(kv.key != key for kv in batch.kvs)
        return any(ev.key == key and ev.kind == "delete" for ev in batch)  # the range also covers key + suffix
    return wait_for(etcd, key, revision, timeout, deleted, probe_interval, f"wait-deleted-{key}")


@dataclasses.dataclass
class _Range:
    name: str
    token: int
    start: str
    end: bytes
    next_revision: int
    watch_id: int | None = None  # etcd's id on the current stream, once created
    removed: bool = False
    deletes_only: bool = False  # etcd filters the puts out (NOPUT): only deletes are delivered


class WatchStream:
    """Several key ranges watched over ONE Watch stream (etcd multiplexes watchers on a stream), so that an agent
    changing what it watches each round costs a request on the open stream, not a new stream and its threads.

    The guarantees of ``Watch`` hold for each range: its events arrive in revision order through
    ``sink(name, token, delivery)``; after any stream error every range resumes from the mod_revision of its last
    event + 1; a range whose revision was compacted is re-read and handed over as a ``Resync``; a dead stream (see
    the module doc: a probe unanswered for 2 probe intervals) is given up (the endpoint marked failed) and resumed.
    ``token`` is what ``add`` returned: a delivery for a token that was removed or replaced since is stale, and the
    consumer drops it.
    """

    def __init__(self, etcd: Etcd, sink: Callable[[str, int, Delivery], None], probe_interval: float = 1.0,
                 name: str = "watch-stream", on_progress: Callable[[int], None] | None = None):
        """``on_progress(revision)``, when given, hears etcd's progress answers on the stream loop's thread: etcd sends
        them only once every range is synced, so every event up to ``revision`` has been delivered before it. Such
        a stream is probed every ``probe_interval`` it stays silent (``liveness.Pulse``'s eager rule)."""
        self.etcd = etcd
        self.sink = sink
        self.on_progress = on_progress
        self.probe_interval = probe_interval
        self.resumes = 0
        self._lock = threading.Lock()
        self._ranges: dict[str, _Range] = {}  # name -> the range watched under it
        self._by_id: dict[int, _Range] = {}
        self._pending: list[_Range] = []  # create requests sent on the current stream, not yet answered, in order
        self._requests: Stream | None = None  # the current stream: requests are written to it
        self._tokens = 0
        self._delivered = False
        self._cancelled = threading.Event()
        self._end: Callable[[BaseException | None], None] | None = None  # gives the current stream up
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "WatchStream":
        self._thread.start()
        return self

    def add(self, name: str, start: str, end: bytes, start_revision: int, deletes_only: bool = False) -> int:
        """Watch ``[start, end)`` (an empty ``end``: the one key ``start``) from ``start_revision`` under ``name``,
        replacing what was watched under that name; returns the token its deliveries carry. ``deletes_only``: etcd
        sends only the range's deletes (a ``Resync`` after a compaction still holds the whole range)."""
        with self._lock:
            self._remove_locked(name)
            self._tokens += 1
            r = _Range(name, self._tokens, start, end, start_revision, deletes_only=deletes_only)
            self._ranges[name] = r
            if self._requests is not None:
                self._create_locked(r)
            return r.token

    def remove(self, name: str) -> None:
        with self._lock:
            self._remove_locked(name)

    def _remove_locked(self, name: str) -> None:
        r = self._ranges.pop(name, None)
        if r is None:
            return
        r.removed = True
        if r.watch_id is not None:
            self._by_id.pop(r.watch_id, None)
            if self._requests is not None:
                self._requests.write(rpc.WatchRequest(cancel_request=rpc.WatchCancelRequest(watch_id=r.watch_id)))
        # still pending: cancelled as soon as etcd says which id it got

    def _create_locked(self, r: _Range) -> None:
        self._pending.append(r)
        self._requests.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=r.start.encode(), range_end=r.end, start_revision=r.next_revision, progress_notify=True,
            filters=[rpc.WatchCreateRequest.NOPUT] if r.deletes_only else [])))

    def cancel(self, wait: bool = True) -> None:
        self._cancelled.set()
        end = self._end
        if end is not None:
            end(None)
        if wait and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if wait:
            LOOP.barrier()  # a delivery under way on the loop's thread has ended; none follows

    def _run(self) -> None:
        backoff = 0.05
        while not self._cancelled.is_set():
            try:
                self._stream()
            except Exception as exc:  # noqa: BLE001 - whatever broke the stream, this thread must not die
                if self._cancelled.is_set():
                    return
                self.resumes += 1
                metrics.watch_resumed()
                if not isinstance(exc, (WatchBroken, EtcdError)):
                    log.exception("watch stream failed unexpectedly; resuming")
                log.info("watch stream broke (%s); resuming %d range(s)", exc, len(self._ranges))
                if self._delivered:
                    backoff, self._delivered = 0.05, False
                self._cancelled.wait(backoff)
                backoff = min(backoff * 2, 1.0)

    def _stream(self) -> None:
        responses: queue.SimpleQueue = queue.SimpleQueue()  # compacted ranges to re-read, then one _End
        channel, auth = self.etcd.stream_channel_and_auth()
        used = self.etcd.current_client()  # the client whose auth token this stream carries
        label = self.etcd.endpoint_label()  # the member this stream goes to: the one blamed if it falls silent

        def give_up(exc: BaseException | None) -> None:  # from any thread: this thread stops waiting on the stream
            stream.close()
            responses.put(_End(exc, given_up=True))

        def answered(resp) -> None:  # on the stream loop's thread: handled there, no hand-off to this thread
            pulse.seen = time.monotonic()
            self.etcd.heard(label, pulse.seen)
            try:
                self._handle(resp, stream, responses.put)
            except Exception as exc:  # noqa: BLE001 - a cancel by etcd (WatchBroken), or worse: raised on this thread
                give_up(exc)
                return
            if resp.events:
                self._delivered = True  # a stream that delivered: a later break resumes without backoff

        pulse = Pulse(self.probe_interval, lambda: self.etcd.last_heard(label),
                      lambda: stream.write(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())),
                      lambda: give_up(None), eager=self.on_progress is not None)
        stream = Stream(rpc.WatchStub(channel).Watch, auth, answered, lambda exc: responses.put(_End(exc)))

        with self._lock:
            self._requests, self._pending, self._by_id = stream, [], {}
            for r in self._ranges.values():
                r.watch_id = None
                self._create_locked(r)
        self._end = give_up
        if self._cancelled.is_set():
            give_up(None)  # cancelled before the stream was in place
        PROBER.add(pulse)
        try:
            while not isinstance(item := responses.get(), _End):
                self._resync(item)  # a compacted range: re-read here, never on the loop
            if pulse.verdict == "dead":
                self.etcd.mark_failed(label)
                raise WatchBroken(f"no answer from etcd member {label or '?'} to a progress request within "
                                  f"{pulse.answer:.1f} s")
            exc = item.error
            if item.given_up and exc is not None:
                raise exc  # what handling an answer raised: etcd canceled a range (TokenRefused among them)
            if exc is None:
                raise WatchBroken("the stream was given up" if item.given_up else "the stream ended")
            if not isinstance(exc, grpc.RpcError):
                raise WatchBroken(f"the watch stream could not run: {exc}") from exc  # Etcd.close() closed it
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.etcd.mark_failed(label)
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                self.etcd.renew_auth(used)
            raise map_grpc_error(exc, "watch") from exc
        except TokenRefused:
            self.etcd.renew_auth(used)  # the next stream logs in again: an etcd restart forgot every token
            raise
        finally:
            PROBER.remove(pulse)
            with self._lock:
                self._requests = None
            self._end = None
            stream.close()

    def _handle(self, resp, requests: Stream, resync: Callable[[_Range], None]) -> None:
        """One answer of the stream, on the loop's thread: events to the sink; a compacted range to ``resync``."""
        if (self.on_progress is not None and not resp.events and not resp.created and not resp.canceled
                and not resp.compact_revision):
            self.on_progress(resp.header.revision)
        with self._lock:
            if resp.created:
                r = self._pending.pop(0) if self._pending else None
                if r is None:
                    return
                r.watch_id = resp.watch_id
                if r.removed:
                    requests.write(rpc.WatchRequest(cancel_request=rpc.WatchCancelRequest(watch_id=resp.watch_id)))
                    return
                self._by_id[resp.watch_id] = r
                if not resp.canceled:
                    return
            r = self._by_id.get(resp.watch_id)
            if r is None or r.removed:
                return  # a range removed since, or a progress notification for the whole stream
            if resp.compact_revision or resp.canceled:
                del self._by_id[resp.watch_id]
                r.watch_id = None
        if resp.compact_revision:
            log.warning("watch on %s: revision %d was compacted (oldest %d); re-reading the range", r.start,
                        r.next_revision, resp.compact_revision)
            resync(r)
            return
        if resp.canceled:
            why = f"etcd canceled the watch on {r.start}: {resp.cancel_reason or 'no reason given'}"
            if _stale_token(resp.cancel_reason, bool(self.etcd.cfg.user)):
                raise TokenRefused(why)
            raise WatchBroken(why)
        if not resp.events:
            return  # a progress notification: liveness only (etcd issue 15220, see Watch._handle)
        events = [Event("delete" if ev.type == _DELETE else "put", KV.from_pb(ev.kv)) for ev in resp.events]
        r.next_revision = events[-1].kv.mod_revision + 1
        self.sink(r.name, r.token, events)

    def _resync(self, r: _Range) -> None:
        """Re-read a compacted range, hand it over, and watch it again from that read (on this stream)."""
        while not self._cancelled.is_set():
            try:
                kvs, rev = self.etcd.get_range(r.start, r.end, deadline=5.0)
                break
            except EtcdError as exc:
                log.warning("watch on %s could not re-read the range: %s", r.start, exc)
                self._cancelled.wait(0.2)
        else:
            return
        with self._lock:
            if r.removed:
                return
            r.next_revision = rev + 1
            if self._requests is not None:
                self._create_locked(r)
        self.sink(r.name, r.token, Resync(kvs, rev))
