"""Keepalives of one lease over LeaseKeepAlive streams: what the session (``session.py``) renews its lease with.

Guarantees:
- Keepalives go as requests on one open stream, as etcd's own clients send them, not a new stream (and its
  threads) per keepalive. etcd answers a stream's requests in order, so a late answer still counts for the request
  it answers: the lease was renewed when etcd read that request, and it lives TTL past the request's send time.
- A stream that broke, or left too many pings in a row unanswered (one with several members, two with one), is
  given up and the member marked failed (``Etcd.mark_failed``): the next ping opens a stream on the member failover
  picks. A frozen member keeps its socket open and never answers, and a follower still forwarding to a frozen
  leader holds every later request of that stream, so only a new stream on another member renews the lease in time.
- A given-up stream that did not break is still listened to until a newer stream answers: a member that was only
  slow (a busy machine) still renews the lease with its late answer.
- A stream costs no thread of its own: it runs on the process's one stream loop (``streams_loop.py``, grpc.aio);
  ``ping`` hands its request over and waits on a queue the stream's answers are put on.
Imports grpc, the generated messages through ``etcd.client``, ``etcd.diagnose`` and ``etcd.streams_loop``;
nothing above ``etcd/``.
"""

from __future__ import annotations

import queue
import time

import grpc

from ..errors import EtcdUnavailable
from .client import Etcd, rpc
from .diagnose import ENDPOINT_FAILED_CODES, map_grpc_error
from .streams_loop import Stream

SPARES = 2  # given-up streams still listened to, newest first


class StreamEnded(Exception):
    """The server ended a stream that should have stayed open."""


class _Line:
    """One LeaseKeepAlive stream to one member, a task of the process's stream loop (``streams_loop``): its answers
    and its end go to ``answers`` as ``(line, answer or error)``."""

    def __init__(self, etcd: Etcd, lease_id: int, answers: queue.SimpleQueue):
        channel, auth = etcd.stream_channel_and_auth()
        self.used = etcd.current_client()  # the client whose token this stream carries
        self.label = etcd.endpoint_label()  # the member it goes to
        self.sent: list[float] = []  # monotonic send times of the requests not answered yet, oldest first
        self.misses = 0
        self._request = rpc.LeaseKeepAliveRequest(ID=lease_id)
        self._stream = Stream(rpc.LeaseStub(channel).LeaseKeepAlive, auth, lambda resp: answers.put((self, resp)),
                              lambda end: answers.put((self, self._ended(end))))

    @staticmethod
    def _ended(end: BaseException | None) -> BaseException:
        if end is None:
            return StreamEnded("etcd ended the keepalive stream")
        if isinstance(end, grpc.RpcError):
            return end
        return StreamEnded(f"the keepalive stream could not run: {end}")  # a channel closed by Etcd.close()

    def send(self) -> None:
        self.sent.append(time.monotonic())
        self._stream.write(self._request)

    def close(self) -> None:
        self._stream.close()


class KeepAliveStream:
    """The keepalives of one lease: ``ping`` sends one and waits for an answer (see the module's guarantees)."""

    MISSES = 2  # pings in a row without any answer before the stream is given up (one etcd endpoint)

    def __init__(self, etcd: Etcd, lease_id: int):
        self.etcd = etcd
        self.lease_id = lease_id
        self._answers: queue.SimpleQueue = queue.SimpleQueue()  # (line, answer or error) from every open line
        self._line: _Line | None = None  # where pings go
        self._spares: list[_Line] = []  # given up, still listened to
        self._allowed = 1 if len(etcd.cfg.endpoints) > 1 else self.MISSES

    def ping(self, timeout: float) -> tuple[int, float]:
        """One keepalive: (the TTL etcd granted, <= 0 when the lease no longer exists; the monotonic time the
        answered request was sent, which the lease outlives by that TTL). EtcdUnavailable when no answer came
        within ``timeout`` seconds or the stream broke; another EtcdError when etcd refused."""
        if self._line is None:
            try:
                self._line = _Line(self.etcd, self.lease_id, self._answers)
            except ValueError as exc:  # "Cannot invoke RPC on closed channel!": another thread rebuilt the client
                raise EtcdUnavailable(f"etcd lease keepalive: the connection was being rebuilt ({exc})") from exc
        line = self._line
        line.send()
        deadline = time.monotonic() + max(0.01, timeout)
        while (left := deadline - time.monotonic()) > 0:
            try:
                source, answer = self._answers.get(timeout=left)
            except queue.Empty:
                break
            if source is not self._line and source not in self._spares:
                continue  # a line closed since
            if hasattr(answer, "TTL"):
                return self._answered(source, answer)
            self._broke(source, answer)
        line.misses += 1
        if line.misses >= self._allowed:
            self._give_up(line)
        raise EtcdUnavailable(f"no lease keepalive answer from etcd member {line.label or '?'} within "
                              f"{timeout:.1f} s") from None

    def _answered(self, source: _Line, answer) -> tuple[int, float]:
        """The newest answer there is now (answers that came in meanwhile are newer). The member answered: its
        watch streams need no probe (``Etcd.heard``)."""
        self.etcd.heard(source.label)
        best = (answer.TTL, source.sent.pop(0))
        if source is self._line:
            source.misses = 0
            self._close_spares()  # they can only answer requests older than this one
        while True:
            try:
                later, more = self._answers.get_nowait()
            except queue.Empty:
                return best
            if later is not self._line and later not in self._spares:
                continue
            if not hasattr(more, "TTL"):
                self._answers.put((later, more))  # an error after the answer: the next ping sees it
                return best
            sent = later.sent.pop(0)
            best = (more.TTL, sent) if more.TTL <= 0 or sent > best[1] else best

    def _broke(self, source: _Line, answer) -> None:
        """A line's stream ended or failed: a spare is dropped quietly; the line in use raises."""
        source.close()
        if source in self._spares:
            self._spares.remove(source)
            return
        self._line = None
        if isinstance(answer, StreamEnded):
            raise EtcdUnavailable(str(answer))
        err = map_grpc_error(answer, "lease keepalive")
        if answer.code() in ENDPOINT_FAILED_CODES:
            self.etcd.mark_failed(source.label)
        if answer.code() == grpc.StatusCode.UNAUTHENTICATED and self.etcd.cfg.user:
            self.etcd.renew_auth(source.used)  # the token died with an etcd restart: log in again
            raise EtcdUnavailable(str(err)) from answer
        raise err from answer

    def _give_up(self, line: _Line) -> None:
        self._line = None
        self._spares.insert(0, line)
        for old in self._spares[SPARES:]:
            old.close()
        del self._spares[SPARES:]
        self.etcd.mark_failed(line.label)

    def _close_spares(self) -> None:
        for old in self._spares:
            old.close()
        self._spares = []

    def close(self) -> None:
        if self._line is not None:
            self._line.close()
            self._line = None
        self._close_spares()
