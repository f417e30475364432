"""The etcd a job runs on when its command line names no etcd cluster, from start to stop.

- A one-node job: an embedded etcd on free loopback ports.
- A multi-node c10d line (``--rdzv-backend c10d --rdzv-endpoint HOST:PORT``): as torchrun's c10d backend hosts its
  store on the node that owns the endpoint's address, the agent that can bind HOST:PORT serves an etcd there for the
  job and the others use it. HOST naming this machine serves on every interface (other nodes may resolve the name to
  another of its addresses); an address serves on that address. Of several agents racing for HOST:PORT exactly one
  serves: one whose etcd fails to bind the port, or whose machine is not HOST, uses the one there and never fails
  for it. Such an agent waits for that etcd up to ``--join-timeout``, then fails with one line naming HOST:PORT.
- The serving agent stops its etcd only after every agent of the job has left (the exit barrier): once its own job
  ended it watches ``P/nodes/`` until it is empty (live agents revoke their leases on exit; a dead one's lease
  expires within its TTL), for at most the lease TTL plus ``LEAVE_GRACE_S``.
- The data lives in a temporary directory, removed on stop.

Imports ``config``, ``errors``, ``logs``, ``etcd/`` (client, server, watch) and ``schema.keys``; never torch.
"""

from __future__ import annotations

import dataclasses
import errno
import queue
import socket
import threading
import time

from .. import logs
from ..config import AgentConfig
from ..endpoints import parse_endpoints
from ..errors import ConfigError, EtcdError, EtcdUnavailable
from ..etcd.client import Etcd
from ..schema.keys import Keys
from ..etcd.server import WILDCARD, EtcdServer, health, url
from ..etcd.watch import Resync, Watch

log = logs.get("etcd_agent.cli.job_etcd")
LEAVE_GRACE_S = 5.0  # beyond the lease TTL, for the last agents to leave before the served etcd stops
LINGER_S = 1.0  # after the last other registration vanished: its agent's revoke reply and last reads still need etcd
_POLL_S = 0.25  # an etcd another machine starts announces nothing: its /health is polled, with a deadline


def names_this_host(host: str) -> bool:
    """True when ``host`` is this machine's own name (short or qualified)."""
    names = {n.lower().rstrip(".") for n in (socket.gethostname(), socket.getfqdn())}
    return host.lower().rstrip(".") in names | {n.split(".")[0] for n in names}


def _bind_probe(address: str, port: int) -> int:
    """0 when a listener could take ``address:port`` now, else EADDRINUSE (taken) or EADDRNOTAVAIL (not this
    machine's address). SO_REUSEADDR as etcd's own listener sets it, so a port with connections in TIME_WAIT is free."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                return exc.errno
            raise ConfigError(f"--rdzv-endpoint: cannot serve etcd at {address}:{port}: {exc.strerror}") from None
    return 0


def listen_address(host: str, port: int) -> str | None:
    """Where to serve ``host:port``, or None when this machine cannot: every interface when ``host`` is this
    machine's name, else the first address ``host`` resolves to that is this machine's. None as soon as one of
    them is taken (``localhost`` as ::1 and 127.0.0.1: one etcd serves the name, never two)."""
    if names_this_host(host):
        addresses = [WILDCARD]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConfigError(f"--rdzv-endpoint: cannot resolve {host!r}: {exc.strerror}") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
    probes = {address: _bind_probe(address, port) for address in addresses}
    if errno.EADDRINUSE in probes.values():
        return None
    return next((address for address, probe in probes.items() if probe == 0), None)


def serve_at(host: str, port: int, timeout: float = 30.0) -> EtcdServer | None:
    """A ready etcd serving clients at ``host:port`` (its peer port a free one on the same host), or None when this
    machine cannot bind that address or another process took the port first (that process serves, not this one)."""
    for _ in range(3):  # a peer port taken between choosing and binding it: choose again
        address = listen_address(host, port)
        if address is None:
            return None
        server = EtcdServer(name="etcd-agent-job", host=address, client_port=port, advertise_host=host)
        try:
            return server.start(timeout)
        except EtcdUnavailable as exc:
            server.stop()
            if "address already in use" not in str(exc):
                raise
    return None


def wait_serving(host: str, port: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for an etcd at ``host:port`` to answer ``/health``; True when it did."""
    deadline = time.monotonic() + timeout
    while not health(url(host, port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


class JobEtcd:
    """``start`` before the agent runs (returns its config, pointed at the etcd), ``stop`` after it ended."""

    def __init__(self, embedded: bool, serve: tuple[str, int] | None):
        self.embedded, self.serve = embedded, serve
        self.server: EtcdServer | None = None
        self.cfg: AgentConfig | None = None

    def start(self, cfg: AgentConfig) -> AgentConfig:
        if self.embedded:
            self.server = EtcdServer(name="etcd-agent-standalone").start()
            cfg = dataclasses.replace(cfg, etcd=dataclasses.replace(
                cfg.etcd, endpoints=parse_endpoints(self.server.endpoint)))
        elif self.serve is not None:
            self._serve_or_join(cfg, *self.serve)
        self.cfg = cfg
        return cfg

    def describe(self, cfg: AgentConfig) -> str:
        """Where the job's etcd is, for the agent's start-up line."""
        if self.embedded and self.server is not None:
            return f"embedded etcd at {self.server.endpoint} (data in {self.server.data_dir})"
        return f"etcd at {','.join(f'{h}:{p}' for h, p in cfg.etcd.endpoints)} over {cfg.etcd.describe()}"

    def _serve_or_join(self, cfg: AgentConfig, host: str, port: int) -> None:
        where = url(host, port).removeprefix("http://")
        self.server = serve_at(host, port)
        if self.server is not None:
            log.info("this agent serves the job's etcd at %s (listening on %s, pid %d, data in %s); it stays up "
                     "until every agent of the job has left", where, self.server.host, self.server.pid,
                     self.server.data_dir)
            return
        log.info("the job's etcd at %s is served by another agent (this one cannot bind it); using it", where)
        if not wait_serving(host, port, cfg.join_timeout):
            raise ConfigError(f"--rdzv-endpoint {where}: no etcd at {where} after {cfg.join_timeout:g} s: the agent "
                              f"that owns {host} did not start one")

    def stop(self, keys: Keys | None) -> None:
        """Stop the etcd this agent serves; a served (c10d) one only once the job's other agents have left."""
        if self.server is None:
            return
        try:
            if self.serve is not None and keys is not None:
                self._wait_for_agents_to_leave(keys)
        finally:
            self.server.stop()

    def _wait_for_agents_to_leave(self, keys: Keys) -> None:
        cfg = self.cfg
        limit = cfg.lease_ttl + LEAVE_GRACE_S
        etcd = Etcd(cfg.etcd)
        try:
            left = _registered(etcd, keys, limit)
        except EtcdError as exc:
            log.warning("cannot read which agents are still registered (%s); stopping the job's etcd", exc)
            return
        finally:
            etcd.close()
        where = self.server.endpoint
        if left:
            log.warning("the job's etcd at %s stops while %s still registered: not gone within %g s",
                        where, ", ".join(sorted(keys.parse(k).node for k in left)), limit)
        else:
            log.info("every agent of the job has left; stopping the job's etcd at %s", where)


def _registered(etcd: Etcd, keys: Keys, limit: float) -> set[str]:
    """The keys under ``P/nodes/`` still there when they are all gone or ``limit`` seconds passed: read, then watch
    from the read's revision + 1."""
    deadline = time.monotonic() + limit
    kvs, rev = etcd.get_prefix(keys.nodes(), deadline)
    left = {kv.key for kv in kvs}
    if not left:
        return left
    left = _watch_until_gone(etcd, keys, rev, left, deadline, limit)
    if not left:  # a registration vanishes when its agent's revoke commits: the reply, and that agent's last reads
        threading.Event().wait(LINGER_S)  # (is it the job's last?), are still on their way; no event tells their end
    return left


def _watch_until_gone(etcd: Etcd, keys: Keys, rev: int, left: set[str], deadline: float, limit: float) -> set[str]:
    """``left`` (read at ``rev``) as it is once empty or at ``deadline``: watched from ``rev`` + 1."""
    log.info("waiting up to %g s for %d other agent(s) of the job to leave (%s) before stopping the job's etcd",
             limit, len(left), ", ".join(sorted(keys.parse(k).node for k in left)))
    deliveries: queue.SimpleQueue = queue.SimpleQueue()
    watch = Watch(etcd, keys.nodes(), rev + 1, deliveries.put, name="agents-leaving").start()
    try:
        while left and (remaining := deadline - time.monotonic()) > 0:
            try:
                batch = deliveries.get(timeout=remaining)
            except queue.Empty:
                break
            if isinstance(batch, Resync):
                left = {kv.key for kv in batch.kvs}
                continue
            for ev in batch:
                (left.discard if ev.kind == "delete" else left.add)(ev.key)
    finally:
        watch.cancel()
    return left
