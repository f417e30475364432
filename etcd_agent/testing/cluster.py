"""Embedded etcd clusters for tests and tools (never imported by the product).

``EtcdCluster``: ``size`` etcd members on loopback sharing one initial cluster, for fault tests (freeze, stop and
restart a member; find the leader). Its members are ``etcd.server.EtcdServer`` processes, so they share that
module's guarantees: nothing is left running when the test process exits.
Imports ``errors``, ``proctree`` and ``etcd.server`` only; nothing in the package imports this module.
"""

from __future__ import annotations

import os
import time
import uuid

from .. import errors
from ..etcd.server import _HEALTH_POLL_S, FAST_ELECTION_ARGS, EtcdServer, is_leader, url
from ..proctree import free_port


class EtcdCluster:
    """``size`` members on loopback sharing one initial cluster, for fault tests. With ``fast_elections`` the
    members also get ``FAST_ELECTION_ARGS`` (unless ``extra_args`` sets its own); without, etcd's own election
    timings (heartbeat 100 ms, election timeout 1000 ms), as a production cluster runs."""

    def __init__(self, size=3, host="127.0.0.1", name_prefix="etcd", extra_args=(), binary=None, base_dir=None,
                 fast_elections=False):
        if fast_elections and not any(a.startswith("--election-timeout") for a in extra_args):
            extra_args = (*extra_args, *FAST_ELECTION_ARGS)
        names = [f"{name_prefix}-{i}" for i in range(size)]
        peers = [free_port(host) for _ in names]
        initial = ",".join(f"{name}={url(host, port)}" for name, port in zip(names, peers))
        token = f"{name_prefix}-{uuid.uuid4().hex[:12]}"
        self.members = [
            EtcdServer(name=name, host=host, peer_port=port, initial_cluster=initial, cluster_token=token,
                       extra_args=extra_args, binary=binary, data_dir=base_dir and os.path.join(base_dir, name))
            for name, port in zip(names, peers)
        ]

    endpoints = property(lambda self: ",".join(m.endpoint for m in self.members))

    def member(self, index: int) -> EtcdServer:
        return self.members[index]

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        deadline = time.monotonic() + timeout
        try:
            for m in self.members:
                m.spawn()
            for m in self.members:
                m.wait_ready(max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        for m in self.members:
            m.stop(timeout)

    def leader_index(self, timeout: float = 10.0) -> int:
        """Index of the member that reports itself leader; waits up to ``timeout`` for an election."""
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.members):
                if m.running and not m.frozen and is_leader(m.client_url):
                    return i
            if time.monotonic() >= deadline:
                raise errors.EtcdUnavailable(f"no etcd leader among {self.endpoints} within {timeout:g} s")
            time.sleep(_HEALTH_POLL_S)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
