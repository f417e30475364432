"""The process's etcd streams on ONE asyncio event loop thread (grpc.aio), not on threads of their own.

Why: a stream driven by gRPC's blocking API costs threads of its own for its whole life (a reader that waits on the
call, gRPC's thread that feeds it the request iterator, gRPC's "channel spin" thread that serves the channel's
streams), and a keepalive passed through five of them. Here every stream of the process (all the ``Etcd``
clients in it: the simulation runs many agents per process) is a task on one loop thread; gRPC's asyncio engine
adds one thread per process that waits on its completion queue without a timeout. The blocking callers (the
session thread, the watch consumers) hand requests over with ``LOOP.call_soon`` (one ``call_soon_threadsafe`` for
every callback handed over while a wake-up of the loop is on its way) and read answers from thread-safe queues their
callbacks fill. A stream uses the call's own ``write``/``read``: one task reads, and a task sends only while written
requests wait (no request iterator, no async generators between gRPC and the callbacks).

Guarantees:
- ``LOOP`` starts its thread on first use, in each process: a forked child that uses it starts its own (the
  parent's thread does not exist there). The thread is a daemon; nothing on it blocks (callbacks only put on
  queues).
- ``Stream`` is one bidirectional streaming call: ``write`` from any thread sends requests in the order written;
  every answer goes to ``on_message`` and the end to ``on_end`` (None when etcd ended the stream, else the gRPC or
  other error), both on the loop thread; once ``close`` returned, none starts (one under way may finish). A call
  that could not start (a closed channel) ends at once through ``on_end``.
- ``aio_channel`` makes a channel on the loop (grpc.aio binds a channel to the loop it is made on) with the target,
  credentials and options given; ``StreamChannels`` (one per ``Etcd`` client) passes those of the client's blocking
  channel to the same member (``etcd/client.py``), so TLS, the reconnect backoff and the message size limit are
  the same on both. The aio channel has a TCP connection of its own (gRPC shares none between the two engines).
Imports grpc and ``logs``; nothing else of the package.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import threading
from typing import Any, Callable, Coroutine

import grpc
import grpc.aio

from .. import logs

log = logs.get("etcd_agent.etcd.streams_loop")


class StreamsLoop:
    """The one event loop thread of this process (see the module doc)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._handed: list[tuple[Callable[..., Any], tuple]] = []  # callbacks handed over, not yet run, in order
        self._wake_due = False  # a drain of ``_handed`` is on its way to the loop

    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None and self._pid == os.getpid():
            return loop  # every hand-over asks: no lock once the loop runs in this process
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                self._handed, self._wake_due = [], False  # a forked child's copy of the parent's is not its own
                self._thread = threading.Thread(target=self._serve, args=(loop,), name="etcd-streams", daemon=True)
                self._loop, self._pid = loop, os.getpid()
                self._thread.start()
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    def on_loop(self) -> bool:
        """Whether the caller runs on the loop's thread (where it must not wait for the loop)."""
        return self._thread is threading.current_thread()

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread, after every callback handed over before it.

        Callbacks handed over while a wake-up of the loop is already on its way ride on it: one
        ``call_soon_threadsafe`` (a write to the loop's self-pipe, and a turn of the loop) runs them all, in order,
        so the many agents of a simulation that write at a round's start cost a few turns, not one each."""
        loop = self.loop()
        with self._lock:
            self._handed.append((fn, args))
            if self._wake_due:
                return
            self._wake_due = True
        loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            handed, self._handed, self._wake_due = self._handed, [], False
        for fn, args in handed:
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - one callback's bug must not drop the others handed over with it
                log.exception("a callback on the stream loop failed")

    def barrier(self, timeout: float = 5.0) -> None:
        """Wait until every callback the loop had when this was called has run (none when called on the loop): after
        ``Stream.close`` and this, no callback of that stream is under way or to come."""
        if self.on_loop() or self._loop is None or self._pid != os.getpid():
            return
        done = concurrent.futures.Future()
        self.call_soon(done.set_result, None)  # behind every callback handed over before
        try:
            done.result(timeout)
        except concurrent.futures.TimeoutError:
            log.debug("the stream loop did not reach a barrier within %.1f s", timeout)

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        """Run a coroutine on the loop; its future, to wait for from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop())

    def aio_channel(self, target: str, credentials: grpc.ChannelCredentials | None,
                    options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        """A grpc.aio channel to ``target``, made on the loop: TLS with ``credentials``, plaintext without. Never
        called on the loop's thread (it waits for the loop)."""
        if self.on_loop():
            raise RuntimeError("an aio channel is made from a thread other than the stream loop's")
        async def make() -> grpc.aio.Channel:
            if credentials is None:
                return grpc.aio.insecure_channel(target, options=options)
            return grpc.aio.secure_channel(target, credentials, options=options)
        return self.submit(make()).result()

    def close_channel(self, channel: grpc.aio.Channel, wait: float = 5.0) -> None:
        """Close an aio channel (its open calls end CANCELLED); waits up to ``wait`` s unless on the loop."""
        future = self.submit(channel.close())
        if not self.on_loop():
            try:
                future.result(wait)
            except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError, RuntimeError) as exc:
                log.debug("closing a stream channel did not finish: %s", exc)


LOOP = StreamsLoop()


class StreamChannels:
    """The aio channels of one ``Etcd`` client: one per member, made on first use, closed together."""

    def __init__(self, options: list[tuple[str, Any]]):
        self._options = options
        self._lock = threading.Lock()
        self._by_target: dict[str, grpc.aio.Channel] = {}

    def get(self, endpoint) -> grpc.aio.Channel:
        """The channel to an ``etcd3.Endpoint``: its target and, when secure, its channel credentials."""
        with self._lock:
            channel = self._by_target.get(endpoint.netloc)
        if channel is not None:
            return channel
        made = LOOP.aio_channel(endpoint.netloc, endpoint.credentials if endpoint.secure else None, self._options)
        with self._lock:
            channel = self._by_target.setdefault(endpoint.netloc, made)
        if channel is not made:  # another thread made one meanwhile
            LOOP.close_channel(made)
        return channel

    def close(self) -> None:
        with self._lock:
            channels, self._by_target = list(self._by_target.values()), {}
        for channel in channels:
            LOOP.close_channel(channel)


class Stream:
    """One bidirectional streaming call on ``LOOP`` (see the module doc)."""

    def __init__(self, method: Callable[..., Any], kwargs: dict, on_message: Callable[[Any], None],
                 on_end: Callable[[BaseException | None], None]):
        """``method``: a stream-stream multicallable of an aio channel's stub (called with ``kwargs``: the call
        credentials and metadata; no request iterator: requests go out with the call's own ``write``)."""
        self._on_message, self._on_end = on_message, on_end
        self._out: collections.deque = collections.deque()  # requests written, not yet handed to gRPC, in order
        self._writing = False  # a task is handing ``_out`` to gRPC
        self._sender: asyncio.Task | None = None  # that task (cancelled when the stream ends: none is left pending)
        self._call = None
        self._closed = False
        LOOP.call_soon(self._start, method, kwargs)

    def _start(self, method: Callable[..., Any], kwargs: dict) -> None:
        if self._closed:
            return
        try:
            self._call = method(**kwargs)
        except Exception as exc:  # noqa: BLE001 - a closed channel, bad arguments: the stream ends at once
            self._closed = True
            self._on_end(exc)
            return
        loop = asyncio.get_running_loop()
        loop.create_task(self._read(self._call))
        if self._out:  # written before the call existed
            self._writing = True
            self._sender = loop.create_task(self._send(self._call))

    async def _read(self, call) -> None:
        """Every answer to ``on_message`` with the call's own ``read`` (no async generator around it: one step of
        this task per answer), then the end to ``on_end``."""
        end: BaseException | None = None
        eof = grpc.aio.EOF
        try:
            while (answer := await call.read()) is not eof:
                if self._closed:
                    return
                self._on_message(answer)
        except asyncio.CancelledError:
            if self._closed:
                return
            end = grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "the stream was cancelled")
        except Exception as exc:  # noqa: BLE001 - grpc.RpcError or worse: the consumer decides
            end = exc
        finally:
            self._stop_sending()
        if not self._closed:
            self._closed = True
            self._on_end(end)

    async def _send(self, call) -> None:
        """Hand the written requests to gRPC one after the other (it takes one send at a time); ends when none is
        left, and the next ``write`` starts another. A failed send ends nothing here: the read sees the call end."""
        try:
            while self._out and not self._closed:
                await call.write(self._out.popleft())
        except Exception as exc:  # noqa: BLE001 - the call ended (its status reaches _read) or was cancelled
            log.debug("a stream request was not sent: %r", exc)
        finally:
            self._writing = False

    def write(self, request: Any) -> None:
        """Send ``request`` on the stream (from any thread); dropped once the stream ended or was closed."""
        LOOP.call_soon(self._put, request)

    def _put(self, request: Any) -> None:
        if self._closed:
            return
        self._out.append(request)
        if self._call is not None and not self._writing:
            self._writing = True
            self._sender = asyncio.get_running_loop().create_task(self._send(self._call))

    def _stop_sending(self) -> None:
        """The call ended or was closed: a send still waiting on it is cancelled, not left pending for good."""
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()

    def close(self) -> None:
        """End the call (from any thread); no callback runs after this."""
        self._closed = True
        LOOP.call_soon(self._cancel)

    def _cancel(self) -> None:
        self._out.clear()
        self._stop_sending()
        if self._call is not None:
            self._call.cancel()
