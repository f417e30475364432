"""The agent's session: one etcd lease, kept alive by a thread, that every node-owned key is bound to.

Invariants:
- Every period comes from the ``Timings`` it is given (``Timings.keepalive``, ``Timings.fence_margin``): one rule
  for the agent, torchrun's backend and the tests. The keepalive runs every TTL/3 over one LeaseKeepAlive stream
  kept open (re-opened after an error). A keepalive sent at time t guarantees the lease lives until at least
  t + TTL, whenever its answer is read.
- With several etcd members it runs every TTL/6, each try waits at most TTL/18 for its answer, and an unanswered
  try is retried at once on another member (``keepalive.py``): a frozen leader is replaced after etcd's election
  timeout (1-2 s by default), and a keepalive sent after that election must still land before the fencing
  deadline, however the freeze fell between two keepalives (at TTL 5: 0.8 s until the next keepalive, 2 s of
  election, two tries of 0.3 s, one of them perhaps on the frozen member: 3.4 s < 3.75 s). Every TTL/3 would be
  enough for a frozen follower (1.7 s + 0.6 s for the try on it + one on a healthy member: about 2.4 s), but not
  for a frozen leader: 1.7 s + 2 s of election + the tries = 4.3 s > 3.75 s, the agent would fence itself while
  its lease lives (etcd's new leader extends every lease). So with several members at TTL 5 the keepalives are
  1.2 requests per second, the one-member 0.6; an idle watch adds 0.1 (``liveness.py``).
- When no keepalive has succeeded for ``TTL - margin`` seconds, or etcd answers that the lease is gone, the
  session is lost: ``lost`` is set and ``on_lost(reason)`` runs once. The margin leaves the agent time to stop
  its workers before peers can see the lease expire (self-fencing). A lost session is never revived; the agent
  starts a new one.
- ``close()`` revokes the lease, so peers see this node's keys deleted at once.

Imports ``etcd.client``, ``etcd.keepalive``, ``config``, ``errors``, ``logs`` and ``metrics``; nothing above ``etcd/``.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from .. import logs, metrics
from ..config import Timings
from ..errors import EtcdError, EtcdUnavailable
from .client import Etcd
from .keepalive import KeepAliveStream

log = logs.get("etcd_agent.etcd.session")


class Session:
    def __init__(self, etcd: Etcd, timings: Timings, on_lost: Callable[[str], None] = lambda why: None):
        self.etcd = etcd
        self.timings = timings
        self.ttl = timings.lease_ttl
        self.on_lost = on_lost
        self.lease_id = 0
        self.lost = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_ok = 0.0

    def start(self, deadline: float | None = None) -> "Session":
        sent = time.monotonic()
        self.lease_id = self.etcd.lease_grant(self.ttl, deadline=deadline)
        self._last_ok = sent
        self._thread = threading.Thread(target=self._run, name=f"keepalive-{self.lease_id:x}", daemon=True)
        self._thread.start()
        log.debug("session lease %x granted with TTL %d s", self.lease_id, self.ttl)
        return self

    @property
    def renewed(self) -> float:
        """The monotonic time the newest answered keepalive (or the grant) was sent: the lease lives TTL past it."""
        return self._last_ok

    def _run(self) -> None:
        stream = KeepAliveStream(self.etcd, self.lease_id)  # one stream for the session's keepalives
        try:
            self._keep(stream)
        finally:
            stream.close()

    def _keep(self, stream) -> None:
        period, attempt, pause = self.timings.keepalive(members=len(self.etcd.cfg.endpoints))
        margin = self.timings.fence_margin
        failed = False
        while not self._closed.wait(pause if failed else max(0.0, self._last_ok + period - time.monotonic())):
            fence_at = self._last_ok + self.ttl - margin
            left = fence_at - time.monotonic()
            if left <= 0:
                self._lose(f"no lease keepalive succeeded for {self.ttl - margin:.1f} s (etcd unreachable)")
                return
            try:
                granted, sent = stream.ping(timeout=min(left, attempt))
            except EtcdUnavailable as exc:
                metrics.keepalive_failed()
                log.warning("lease %x keepalive failed, %.1f s left before self-fencing: %s", self.lease_id,
                            max(0.0, fence_at - time.monotonic()), exc)
                failed = True
                continue
            except EtcdError as exc:
                self._lose(f"lease keepalive failed: {exc}")
                return
            except Exception:  # noqa: BLE001 - this thread must never die silently; the deadline still applies
                metrics.keepalive_failed()
                log.exception("lease %x keepalive failed unexpectedly", self.lease_id)
                failed = True
                continue
            if granted <= 0:
                self._lose(f"lease {self.lease_id:x} expired on the etcd side")
                return
            self._last_ok, failed = sent, False

    def _lose(self, reason: str) -> None:
        if self._closed.is_set() or self.lost.is_set():
            return
        self.lost.set()
        metrics.session_lost()
        log.error("session lost: %s", reason)
        self.on_lost(reason)

    def close(self, revoke: bool = True, deadline: float = 2.0) -> None:
        """Stop the keepalive and (by default) revoke the lease so this node's keys vanish at once."""
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=deadline + 1)
        if revoke and self.lease_id:
            try:
                self.etcd.lease_revoke(self.lease_id, deadline=deadline)
            except EtcdError as exc:
                log.warning("could not revoke lease %x (it expires by itself within %d s): %s",
                            self.lease_id, self.ttl, exc)
