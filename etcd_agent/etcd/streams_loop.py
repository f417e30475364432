"""The process's etcd streams on ONE asyncio event loop thread (grpc.aio), not on threads of their own.

Why: a stream driven by gRPC's blocking API costs threads of its own for its whole life (a reader that waits on the
call, gRPC's thread that feeds it the request iterator, gRPC's "channel spin" thread that serves the channel's
streams), and a keepalive passed through five of them. Here every stream of the process (all the ``Etcd``
clients in it: the simulation runs many agents per process) is a task on one loop thread; gRPC's asyncio engine
adds one thread per process that waits on its completion queue without a timeout. The blocking callers (the
session thread, the watch consumers) hand requests over with ``loop.call_soon_threadsafe`` and read answers from
thread-safe queues their callbacks fill.

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

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
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
        """Run ``fn(*args)`` on the loop thread, after every callback handed over before it."""
        self.loop().call_soon_threadsafe(fn, *args)

    def barrier(self, timeout: float = 5.0) -> None:
        """Wait until every callback the loop had when this was called has run (none when called on the loop): after
        ``Stream.close`` and this, no callback of that stream is under way or to come."""
        if self.on_loop() or self._loop is None or self._pid != os.getpid():
            return
        done = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(done.set_result, None)
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
        """``method``: a stream-stream multicallable of an aio channel's stub (called with a request iterator and
        ``kwargs``: the call credentials and metadata)."""
        self._on_message, self._on_end = on_message, on_end
        self._requests: asyncio.Queue | None = None
        self._call = None
        self._closed = False
        LOOP.call_soon(self._start, method, kwargs)

    def _start(self, method: Callable[..., Any], kwargs: dict) -> None:
        if self._closed:
            return
        self._requests = asyncio.Queue()
        try:
            self._call = method(self._iterate(self._requests), **kwargs)
        except Exception as exc:  # noqa: BLE001 - a closed channel, bad arguments: the stream ends at once
            self._closed = True
            self._on_end(exc)
            return
        asyncio.get_running_loop().create_task(self._read(self._call))

    @staticmethod
    async def _iterate(requests: asyncio.Queue):
        while (request := await requests.get()) is not None:
            yield request

    async def _read(self, call) -> None:
        end: BaseException | None = None
        try:
            async for answer in call:
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
        if not self._closed:
            self._closed = True
            self._on_end(end)

    def write(self, request: Any) -> None:
        """Send ``request`` on the stream (from any thread); dropped once the stream ended or was closed."""
        LOOP.call_soon(self._put, request)

    def _put(self, request: Any) -> None:
        if not self._closed and self._requests is not None:
            self._requests.put_nowait(request)

    def close(self) -> None:
        """End the call (from any thread); no callback runs after this."""
        self._closed = True
        LOOP.call_soon(self._cancel)

    def _cancel(self) -> None:
        if self._requests is not None:
            self._requests.put_nowait(None)
        if self._call is not None:
            self._call.cancel()
