"""etcd's Prometheus ``/metrics``, scraped before and after a scenario; the differences are what it cost etcd. Used
by the benchmark (tools/bench/scale.py) and by the tests that count what etcd did (``scrape``, ``diff``) or wait on
a counter (``total``: a counter has no event to wait on; it is polled).

What each counter counts on etcd 3.4.23 (checked one operation at a time with etcdctl against a private etcd; the
``etcd_debugging_mvcc_*`` twins of the ``etcd_mvcc_*`` counters move with them):

- ``etcd_mvcc_put_total``: keys written, by a plain Put or by a put inside a txn alike (a txn with 2 puts: +2).
- ``etcd_mvcc_delete_total``: delete operations applied: one DeleteRange is +1 however many keys it removes; a lease
  revoke (or expiry) deletes each attached key with its own operation (+1 per key).
- ``etcd_mvcc_txn_total``: applied write txns of more than one write (2 puts; a lease revoke of 2 keys). A txn that
  wrote one key, or whose compare failed, does not count, so this is not the number of txn requests:
  ``grpc_server_handled_total{grpc_method="Txn"}`` is (every finished Txn RPC, whichever branch ran).
- ``etcd_mvcc_range_total``: range operations, including the read behind each txn compare.
- ``etcd_debugging_mvcc_events_total``: watch events sent, summed over watchers (one put seen by 2 watchers: +2).
- ``grpc_server_handled_total{grpc_method=M}``: finished RPCs of method M (Put, Txn, DeleteRange, Range,
  LeaseGrant, LeaseRevoke), any status.
- ``grpc_server_msg_sent_total{grpc_method="Watch"}``: watch responses: event batches plus "created" and progress
  notifications. ``grpc_server_msg_received_total{grpc_method="LeaseKeepAlive"}``: keepalive requests.
- ``etcd_network_client_grpc_sent_bytes_total``: bytes sent to clients.
- ``etcd_debugging_mvcc_current_revision`` (a gauge): its difference is the number of write revisions.

Imports only the standard library; the product never imports this module.
"""

from __future__ import annotations

import re
import urllib.request

_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="([^"]*)"')
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy

# name in our results -> (metric name, required labels); several matching series are summed
QUANTITIES = {
    "key_puts": ("etcd_mvcc_put_total", {}),
    "key_deletes": ("etcd_mvcc_delete_total", {}),
    "mvcc_write_txns": ("etcd_mvcc_txn_total", {}),
    "mvcc_ranges": ("etcd_mvcc_range_total", {}),
    "watch_events": ("etcd_debugging_mvcc_events_total", {}),
    "rpc_txn": ("grpc_server_handled_total", {"grpc_method": "Txn", "grpc_service": "etcdserverpb.KV"}),
    "rpc_put": ("grpc_server_handled_total", {"grpc_method": "Put", "grpc_service": "etcdserverpb.KV"}),
    "rpc_delete": ("grpc_server_handled_total", {"grpc_method": "DeleteRange", "grpc_service": "etcdserverpb.KV"}),
    "rpc_range": ("grpc_server_handled_total", {"grpc_method": "Range", "grpc_service": "etcdserverpb.KV"}),
    "rpc_lease_grant": ("grpc_server_handled_total", {"grpc_method": "LeaseGrant"}),
    "rpc_lease_revoke": ("grpc_server_handled_total", {"grpc_method": "LeaseRevoke"}),
    "keepalives": ("grpc_server_msg_received_total", {"grpc_method": "LeaseKeepAlive"}),
    "watch_responses": ("grpc_server_msg_sent_total", {"grpc_method": "Watch", "grpc_service": "etcdserverpb.Watch"}),
    "sent_bytes": ("etcd_network_client_grpc_sent_bytes_total", {}),
    "revision": ("etcd_debugging_mvcc_current_revision", {}),
}
GAUGES = {"slow_watchers": "etcd_debugging_mvcc_slow_watcher_total", "watchers": "etcd_debugging_mvcc_watcher_total",
          "keys": "etcd_debugging_mvcc_keys_total", "db_bytes": "etcd_mvcc_db_total_size_in_bytes"}


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m:
            try:
                out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
            except ValueError:
                continue
    return out


def read(client_url: str, timeout: float = 30.0) -> list[tuple[str, dict[str, str], float]]:
    """Every series of the server's ``/metrics`` now: (name, labels, value)."""
    with _http.open(f"{client_url}/metrics", timeout=timeout) as resp:
        return parse(resp.read().decode())


def total(client_url: str, metric: str, **labels: str) -> float:
    """The sum of ``metric``'s series whose labels include ``labels`` (0 when there is none)."""
    return sum(v for n, lab, v in read(client_url) if n == metric and all(lab.get(k) == w for k, w in labels.items()))


def scrape(client_url: str, timeout: float = 30.0) -> dict[str, float]:
    """The quantities of ``QUANTITIES`` and ``GAUGES`` now (missing series read as 0)."""
    series = read(client_url, timeout)
    values = {}
    for name, (metric, labels) in QUANTITIES.items():
        values[name] = sum(v for n, lab, v in series
                           if n == metric and all(lab.get(k) == want for k, want in labels.items()))
    for name, metric in GAUGES.items():
        values[name] = sum(v for n, _lab, v in series if n == metric)
    return values


def diff(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counter differences; gauges as their value after."""
    out = {k: after[k] - before[k] for k in QUANTITIES}
    out.update({k: after[k] for k in GAUGES})
    return out
