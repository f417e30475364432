"""The agent's session: one etcd lease, kept alive by a thread, that every node-owned key is bound to.

Invariants:
- Every period comes from the ``Timings`` it is given (``Timings.keepalive``, ``Timings.fence_margin``): one rule
  for the agent, torchrun's backend and the tests. Keepalives go over one LeaseKeepAlive stream kept open
  (re-opened after an error, ``keepalive.py``). A keepalive sent at time t guarantees the lease lives until at least
  t + TTL, whenever its answer is read; the session is fenced TTL - margin after the newest answered one's send, L.
  A failed try is followed by the next at once, or ``pause`` s after it went out if it failed sooner (a refused
  stream is not retried in a tight loop). With one member: every TTL/3, each try waits TTL/9.
- With several members an unanswered try is given up and the next goes to another member (the one that failed
  longest ago: tries go round the members; a late answer on a given-up stream still counts). The worst case is a
  frozen LEADER: a keepalive to a follower is forwarded to it and hangs, so none lands until the others elect a new
  leader, within ``ELECTION`` = 2 s of the freeze with etcd's defaults (a follower campaigns 1-2 s after the last
  heartbeat; the vote takes milliseconds). At TTL 5 (fenced at L + 3.75) the rule gives:
  the freeze falls just before the keepalive due at L + 1.2 (the period); that try waits 0.4 s, then retries of
  0.15 s go round the members, all lost until the election (by L + 3.2); the retry in flight then is lost too (by
  L + 3.35), the next may go to the frozen member (by L + 3.5), and the one after reaches a live member, which has
  the 0.25 s left (``ANSWER``) to answer: L + 3.75. Every TTL/3 would need 1.67 + 2 + 0.3 > 3.75 s. A frozen
  follower costs one try: the next member answers by L + 1.2 + 0.4 + its answer. So an idle agent sends 0.83
  keepalives per second at TTL 5 (0.6 with one member; 1.2 with the TTL/6 of before) and its idle watch 0.1
  (``liveness.py``). From TTL 7 on the worst case fits with TTL/3 and retries get what is left (0.96 s at TTL 10);
  below TTL 5 it does not fit etcd's default election (the period stays TTL/6: use faster elections there).
  An election can take longer than 2 s: with etcd 3.4's defaults (no pre-vote) a follower ignores a vote that
  comes within its election timeout of the leader's last heartbeat, and the candidate waits another 1-2 s (5 of
  60 elections on 3 local members, the longest 2.8 s). A freeze late in a keepalive period then fences the session:
  in a model of etcd's election, about 0.5% of frozen leaders at a random moment (0.6% with every TTL/6, 6% with
  every TTL/3); no period of at most 1 request per second covers a 2.9 s election at TTL 5.
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
        period, attempt, retry, pause = self.timings.keepalive(members=len(self.etcd.cfg.endpoints))
        margin = self.timings.fence_margin
        failed, tried = False, 0.0
        while not self._closed.wait(max(0.0, (tried + pause if failed else self._last_ok + period) - time.monotonic())):
            fence_at = self._last_ok + self.ttl - margin
            left = fence_at - time.monotonic()
            if left <= 0:
                self._lose(f"no lease keepalive succeeded for {self.ttl - margin:.1f} s (etcd unreachable)")
                return
            tried = time.monotonic()
            try:
                granted, sent = stream.ping(timeout=min(left, retry if failed else attempt))
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
