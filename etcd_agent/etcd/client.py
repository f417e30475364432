"""The etcd v3 client: with the rest of ``etcd/``, the only code that imports ``etcd3``.

Guarantees:
- Connects through ``MultiEndpointEtcd3Client`` with failover and a 1 s endpoint retry, even for one endpoint,
  and fast gRPC reconnect backoff, so a restarted or failed-over etcd is used again within about a second.
- Every unary call is retried on connection errors and timeouts with a tenacity policy bounded by the caller's
  deadline and the shutdown event. Our txns are all guarded by compares, so a retried txn that already applied
  fails its compare and the caller re-reads and decides again.
- Every gRPC or library error leaves this module as one of our own ``EtcdError`` types (``diagnose.py`` says which,
  and what a TLS failure means). A call that retries says so: each retry in the debug log, and once per call at
  INFO when it has kept retrying past a second (etcd slow or away, not a blip).
- Password auth: the token is renewed by rebuilding the client on UNAUTHENTICATED.
- Failover moves calls off a member as soon as a call to it times out, to the member that failed longest ago (or
  never), blaming the member the failed call went to, never the one in use by then (``mark_failed``).
- It notes when each member last answered (``heard``; forgotten when marked failed), so that a silent watch stream
  is probed only when its member fell silent too (``liveness.py``).
The session (``session.py``), its keepalives (``keepalive.py``) and the resumable watch (``watch.py``) build on the
primitives here. gRPC's environment is set by ``etcd/__init__.py`` before grpc is imported; its idle waits are
made to sleep, not poll, by ``etcd/waits.py`` in the agent's own process only. Imports the base modules,
``schema.keys``, ``etcd.diagnose``, ``etcd.liveness``, ``etcd.retry``, ``etcd.streams_loop``; nothing above etcd/.
"""

from __future__ import annotations

import dataclasses
import pathlib
import threading
import time
from typing import Callable, Iterable, Sequence, TypeVar

import etcd3
import grpc
# etcdrpc is re-exported for watch.py: the generated messages and stubs
from etcd3 import etcdrpc as rpc
from etcd3 import exceptions as etcd3_exc

from .. import logs, metrics
from ..config import EtcdConfig
from ..errors import EtcdNoSpace, EtcdRequestError, EtcdTlsError, EtcdUnavailable
from ..schema.keys import prefix_end  # noqa: F401  (pure; re-exported for the watch)
from .diagnose import ENDPOINT_FAILED_CODES, map_grpc_error, plaintext_to_tls, tls_problem
from .liveness import PROBER
from .retry import retrying
from .streams_loop import StreamChannels

log = logs.get("etcd_agent.etcd.client")
T = TypeVar("T")

GRPC_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


@dataclasses.dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_pb(cls, kv) -> "KV":
        return cls(kv.key.decode("utf-8", "replace"), bytes(kv.value), kv.create_revision, kv.mod_revision, kv.version,
                   kv.lease)


@dataclasses.dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    ranges: list[list[KV]]  # one list per range op of the branch that ran, in order
    counts: list[int] = dataclasses.field(default_factory=list)  # etcd's count for each range op, in order


# --- compares and ops: tiny builders over the generated messages ---------------------------------------------

def mod_is(key: str, revision: int):
    """Compare: the key's mod_revision equals ``revision`` (0 means the key is absent)."""
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=key.encode(), mod_revision=revision)


def created_at(key: str, revision: int):
    """Compare: the key exists and was created at ``revision`` (deleted or re-created keys fail)."""
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=key.encode(),
                       create_revision=revision)


def absent(key: str):
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VERSION, key=key.encode(), version=0)


def unchanged_under(prefix: str, revision: int):
    """Compare: no key under ``prefix`` was written after ``revision`` (a range compare, one op for any number of
    keys; a deleted key is not seen by it)."""
    return rpc.Compare(result=rpc.Compare.LESS, target=rpc.Compare.MOD, key=prefix.encode(),
                       range_end=prefix_end(prefix), mod_revision=revision + 1)


def none_under(prefix: str):
    """Compare: no key starts with ``prefix`` (etcd compares a range key by key; an empty range compares as absent)."""
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VERSION, key=prefix.encode(),
                       range_end=prefix_end(prefix), version=0)


def op_put(key: str, value: bytes, lease: int = 0):
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=value, lease=lease))


def op_delete(key: str):
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key.encode()))


def op_get(key: str):
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key.encode()))


def op_get_at(key: str, revision: int):
    """The key as of ``revision`` (0: the latest): the later txns of a read split over several, pinned to the first
    one's revision, read one consistent state (a compacted revision fails with etcd's "compacted" error)."""
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key.encode(), revision=revision))


def value_is(key: str, value: bytes):
    """Compare: the key exists and holds ``value`` (a compare on an absent key is false)."""
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE, key=key.encode(), value=value)


def op_get_range(start: str, end: bytes):
    """Every key in ``[start, end)`` (an empty ``end``: the one key ``start``)."""
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=start.encode(), range_end=end))


def op_count(prefix: str):
    """How many keys start with ``prefix`` (the txn's answer for it is a count, not keys)."""
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=prefix.encode(), range_end=prefix_end(prefix),
                                                       count_only=True))


def op_get_prefix(prefix: str):
    return op_get_range(prefix, prefix_end(prefix))


def op_first_created(prefix: str, limit: int = 1):
    """The ``limit`` keys under ``prefix`` with the lowest create revisions, oldest first (etcd's election pattern:
    the first is the leader)."""
    return rpc.RequestOp(request_range=rpc.RangeRequest(
        key=prefix.encode(), range_end=prefix_end(prefix), limit=limit,
        sort_order=rpc.RangeRequest.ASCEND, sort_target=rpc.RangeRequest.CREATE))


def _read(path: str | None) -> bytes | None:
    return None if path is None else pathlib.Path(path).read_bytes()


class Etcd:
    """A connection to one etcd cluster with failover, retries and our own error types."""

    def __init__(self, cfg: EtcdConfig, stop_event: threading.Event | None = None,
                 interrupt: Callable[[], bool] | None = None):
        self.cfg = cfg
        self.stop_event = stop_event
        self.interrupt = interrupt or (lambda: False)  # True: the caller's session was lost, stop retrying
        self._lock = threading.Lock()
        self._failover_lock = threading.Lock()
        self._probed: set[str | None] = set()  # members already checked for TLS after a "Socket closed"
        self._client: etcd3.MultiEndpointEtcd3Client | None = None
        self._heard: dict[str | None, float] = {}  # member label -> monotonic time of its last answer
        self._streams = StreamChannels(GRPC_OPTIONS)  # one grpc.aio channel per member, for the streams

    # -- connection --
    def _build(self) -> etcd3.MultiEndpointEtcd3Client:
        creds = None
        if self.cfg.secure:  # without a CA file: gRPC's default roots (the system's CA bundle)
            creds = grpc.ssl_channel_credentials(*(_read(path) for path in (self.cfg.ca_cert, self.cfg.key,
                                                                            self.cfg.cert)))
        endpoints = [etcd3.Endpoint(host, port, secure=self.cfg.secure, creds=creds, time_retry=1.0,
                                    opts=GRPC_OPTIONS) for host, port in self.cfg.endpoints]
        try:
            return etcd3.MultiEndpointEtcd3Client(endpoints=endpoints, timeout=self.cfg.request_timeout,
                                                  user=self.cfg.user, password=self.cfg.password, failover=True)
        except grpc.RpcError as exc:
            raise map_grpc_error(exc, "authenticate") from exc

    @property
    def client(self) -> etcd3.MultiEndpointEtcd3Client:
        with self._lock:
            if self._client is None:
                self._client = self._build()
            return self._client

    def _reset(self) -> None:
        with self._lock:
            old, self._client = self._client, None
        if old is not None:
            old.close()

    def channel_and_auth(self):
        """(channel, call kwargs) of the endpoint in use: for the streaming calls in watch.py and session.py."""
        client = self.client
        try:
            channel = client.channel
        except etcd3_exc.NoServerAvailableError as exc:
            raise EtcdUnavailable(f"no etcd endpoint of {self.endpoints_text} is available") from exc
        return channel, {"credentials": client.call_credentials, "metadata": client.metadata}

    def stream_channel_and_auth(self):
        """(grpc.aio channel, call kwargs) of the member unary calls use now: for the streams (``streams_loop``)."""
        _, auth = self.channel_and_auth()  # picks the member as for unary calls (failover)
        return self._streams.get(self.client.endpoint_in_use), auth

    def renew_auth(self, used=None) -> bool:
        """etcd refused our auth token (an etcd restart forgets every token; simple tokens also expire when idle):
        log in again, by rebuilding the client, unless this connection has no user or another caller already
        rebuilt it since ``used`` (the client the refused call went through) was current. True if rebuilt."""
        if not self.cfg.user:
            return False
        with self._lock:
            if used is not None and self._client is not used:
                return False
            old, self._client = self._client, None
        if old is not None:
            old.close()
        log.info("etcd refused the auth token of user %s; logging in again", self.cfg.user)
        return True

    def current_client(self):
        """The client in use now (None before the first call): what ``renew_auth`` compares with."""
        return self._client

    def endpoint_label(self) -> str | None:
        """``HOST:PORT`` of the member calls go to now (None before the first call): what ``mark_failed`` takes."""
        client = self._client
        return None if client is None else client._current_endpoint_label

    def heard(self, label: str | None, at: float | None = None) -> None:
        """The member ``label`` answered (at ``at``, default now): unary calls, keepalives, watch responses."""
        self._heard[label] = time.monotonic() if at is None else at

    def last_heard(self, label: str | None) -> float:
        """When the member ``label`` last answered (monotonic; 0 when never, or not since it was marked failed)."""
        return self._heard.get(label, 0.0)

    def mark_failed(self, label: str | None = None) -> None:
        """Tell failover that the member ``label`` (default: the one in use) misbehaved: it refused, timed out, or
        its stream fell silent. Pass the member the failed call went to, never whatever is in use by now: a late
        timeout must not blame the member another call already moved to. When that member is still in use, calls
        move at once to the member that failed longest ago (or never): etcd3's own choice, the first member not
        failed within its 1 s retry time, would go back to a frozen member after a second."""
        client = self._client
        if self._heard.pop(label or (client and client._current_endpoint_label), None) is not None:
            PROBER.wake()  # its watch streams no longer count what it said before: they may need a probe now
        if client is None or len(client.endpoints) < 2:
            return
        with self._failover_lock:
            endpoint = client.endpoints.get(label or client._current_endpoint_label)
            if endpoint is None:
                return
            endpoint.fail()
            if endpoint.netloc != client._current_endpoint_label:
                return  # calls already moved on
            best = min((e for e in client.endpoints.values() if e is not endpoint), key=lambda e: e.last_failed)
            best.last_failed = 0  # tried again now, even if it too failed within the last second
            client._current_endpoint_label = best.netloc  # drops the cached stubs of the failed member
        log.info("etcd member %s failed or did not answer in time; calls go to %s now", endpoint.netloc, best.netloc)

    @property
    def endpoints_text(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.cfg.endpoints)

    def close(self) -> None:
        self._reset()
        self._streams.close()

    # -- calls --
    def call(self, where: str, fn: Callable[[etcd3.MultiEndpointEtcd3Client, dict], T],
             deadline: float | None = None, attempt_timeout: float | None = None, final: bool = False) -> T:
        """Run ``fn(client, call_kwargs)`` with retries; ``where`` names the operation in errors.

        ``deadline`` bounds all attempts (default: the connect timeout), ``attempt_timeout`` each one (default:
        the request timeout), so a frozen member costs one short attempt before failover tries the next. A
        ``final`` call (revoking the lease on the way out) keeps retrying through shutdown, within its deadline."""
        limit = self.cfg.connect_timeout if deadline is None else deadline
        end = time.monotonic() + limit
        per_attempt = attempt_timeout or self.cfg.request_timeout

        def attempt() -> T:
            client = self._client or self.client  # the lock only to build it
            timeout = max(0.05, min(per_attempt, end - time.monotonic()))
            kwargs = {"timeout": timeout, "credentials": client.call_credentials,
                      "metadata": client.metadata}
            label = client._current_endpoint_label
            try:
                answer = fn(client, kwargs)
                self._heard[label] = time.monotonic()
                return answer
            except etcd3_exc.NoServerAvailableError as exc:
                raise EtcdUnavailable(f"etcd {where}: no endpoint of {self.endpoints_text} is available") from exc
            except ValueError as exc:  # "Cannot invoke RPC on closed channel!": another thread rebuilt the client
                if "closed channel" not in str(exc):
                    raise
                raise EtcdUnavailable(f"etcd {where}: the connection was being rebuilt") from exc
            except grpc.RpcError as exc:
                err = map_grpc_error(exc, where)
                tls = tls_problem(self.cfg, exc.details() if hasattr(exc, "details") else "")
                if tls:  # no retry fixes a certificate: say which one at once
                    raise EtcdTlsError(f"TLS with etcd at {self.endpoints_text} failed: {tls}") from exc
                if label not in self._probed:  # a plaintext client meeting a TLS etcd: say so at once
                    self._probed.add(label)
                    if wrong := plaintext_to_tls(self.cfg, label, exc.details() if hasattr(exc, "details") else ""):
                        raise EtcdTlsError(wrong) from exc
                if exc.code() in ENDPOINT_FAILED_CODES:
                    self.mark_failed(label)
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED and self.cfg.user:
                    self.renew_auth(client)  # the token is not refreshed after an etcd restart: log in again
                    raise EtcdUnavailable(str(err)) from exc
                raise err from exc

        try:
            return retrying(metrics.timed(attempt), end, None if final else self.stop_event,
                            None if final else self.interrupt, where)
        except EtcdNoSpace:
            raise  # etcd answered: it is full, not unreachable, and no retry empties it
        except EtcdUnavailable as exc:  # given up at the deadline, or earlier: the caller's session was lost
            why = "before its session was lost" if not final and self.interrupt() else f"within {limit:.1f} s"
            raise EtcdUnavailable(f"cannot reach etcd at {self.endpoints_text} {why}: {exc}") from exc

    def status(self, deadline: float | None = None) -> str:
        """The version string of the etcd member answering; used to check reachability at start."""
        resp = self.call("status", lambda c, kw: c.maintenancestub.Status(rpc.StatusRequest(), **kw), deadline)
        return resp.version

    def get(self, key: str, deadline: float | None = None) -> tuple[KV | None, int]:
        resp = self.call(f"get {key}", lambda c, kw: c.kvstub.Range(rpc.RangeRequest(key=key.encode()), **kw),
                         deadline)
        return (KV.from_pb(resp.kvs[0]) if resp.kvs else None), resp.header.revision

    def get_prefix(self, prefix: str, deadline: float | None = None) -> tuple[list[KV], int]:
        return self.get_range(prefix, prefix_end(prefix), deadline)

    def get_range(self, start: str, end: bytes, deadline: float | None = None) -> tuple[list[KV], int]:
        """Every key in ``[start, end)`` and the revision of the read."""
        req = rpc.RangeRequest(key=start.encode(), range_end=end)
        resp = self.call(f"get {start}..{end.decode('utf-8', 'replace')}", lambda c, kw: c.kvstub.Range(req, **kw),
                         deadline)
        return [KV.from_pb(kv) for kv in resp.kvs], resp.header.revision

    def txn(self, compare: Sequence, success: Iterable, failure: Iterable = (), where: str = "txn",
            deadline: float | None = None) -> TxnResult:
        req = rpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        resp = self.call(where, lambda c, kw: c.kvstub.Txn(req, **kw), deadline)
        found = [r.response_range for r in resp.responses if r.WhichOneof("response") == "response_range"]
        return TxnResult(resp.succeeded, resp.header.revision, [[KV.from_pb(kv) for kv in r.kvs] for r in found],
                         [r.count for r in found])

    def put(self, key: str, value: bytes, lease: int = 0, deadline: float | None = None) -> int:
        req = rpc.PutRequest(key=key.encode(), value=value, lease=lease)
        return self.call(f"put {key}", lambda c, kw: c.kvstub.Put(req, **kw), deadline).header.revision

    def delete_range(self, start: str, end: bytes = b"", deadline: float | None = None) -> int:
        """Delete every key in ``[start, end)`` (an empty ``end``: the one key ``start``); returns how many were."""
        req = rpc.DeleteRangeRequest(key=start.encode(), range_end=end)
        return self.call(f"delete {start}", lambda c, kw: c.kvstub.DeleteRange(req, **kw), deadline).deleted

    def count_range(self, start: str, end: bytes, deadline: float | None = None) -> int:
        """How many keys ``[start, end)`` holds, without reading their values."""
        req = rpc.RangeRequest(key=start.encode(), range_end=end, count_only=True)
        return self.call(f"count {start}", lambda c, kw: c.kvstub.Range(req, **kw), deadline).count

    def keys_in_range(self, start: str, end: bytes, deadline: float | None = None) -> list[str]:
        """The keys of ``[start, end)``, without their values."""
        req = rpc.RangeRequest(key=start.encode(), range_end=end, keys_only=True)
        resp = self.call(f"list {start}", lambda c, kw: c.kvstub.Range(req, **kw), deadline)
        return [kv.key.decode("utf-8", "replace") for kv in resp.kvs]

    def compact(self, revision: int) -> None:
        req = rpc.CompactionRequest(revision=revision, physical=True)
        self.call("compact", lambda c, kw: c.kvstub.Compact(req, **kw))

    # -- leases --
    def lease_grant(self, ttl: int, deadline: float | None = None) -> int:
        resp = self.call("lease grant", lambda c, kw: c.leasestub.LeaseGrant(rpc.LeaseGrantRequest(TTL=ttl), **kw),
                         deadline)
        if resp.error:
            raise EtcdRequestError(f"etcd lease grant failed: {resp.error}")
        return resp.ID

    def lease_ttl(self, lease_id: int, deadline: float | None = None) -> int:
        """The seconds the lease has left; -1 when it does not exist (expired or revoked)."""
        req = rpc.LeaseTimeToLiveRequest(ID=lease_id)
        return self.call("lease time-to-live", lambda c, kw: c.leasestub.LeaseTimeToLive(req, **kw), deadline).TTL

    def lease_revoke(self, lease_id: int, deadline: float | None = None) -> None:
        def revoke(c, kw):
            try:
                c.leasestub.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease_id), **kw)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:  # already expired: nothing to revoke
                    raise
        self.call("lease revoke", revoke, deadline, final=True)
