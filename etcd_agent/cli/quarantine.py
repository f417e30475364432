"""``etcd-agent quarantine list|add|release [NODE]``: the operator's view of the cluster-wide quarantine records
(``<root>/.quarantine/<node>``, honoured by every job on the etcd) and, with ``--run-id``, of that run's current
job's own (``P/quarantine/<node>``).

- ``list``: one line per record that holds a node out now, ``NODE SCOPE UNTIL REASON`` (``--all``: also records
  that only count failures or whose cooldown ended); a record that is not valid is listed as such, named by its
  key, and the others still print. Exit 0.
- ``add NODE --for SECONDS [--reason TEXT]``: a cluster-wide quarantine (it replaces the node's record there).
  An agent of any job sees it at its next join; running workers are not stopped. Exit 0.
- ``release NODE``: delete the node's cluster record (and with ``--run-id`` the job's record too); a node held out
  by it checks itself again at once. Exit 0 when something was released, 1 when the node had no record.

Bad usage (no NODE, a bad node id, ``--for`` not a positive number of seconds up to a year) is exit 2 with one line
naming the flag. Imports ``cli.flags``, ``config``, ``errors``, ``etcd/``, ``schema/`` and ``coord/``.
"""

from __future__ import annotations

import argparse
import time

from ..config import _NODE_ID_RE, MAX_PERIOD
from ..coord import quarantine, txns
from ..errors import BadKeyData, ConfigError
from ..etcd.client import Etcd
from ..schema.keys import RunKeys, cluster_quarantine, cluster_quarantines
from ..schema.values import Quarantine
from .flags import Store, log_flags

ACTIONS = ("list", "add", "release")
DEFAULT_FOR = 3600.0  # seconds an operator's quarantine lasts unless --for says otherwise


def quarantine_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("action", choices=ACTIONS, help="list the records, add one (cluster-wide), or release a node")
    p.add_argument("node", nargs="?", help="the node id (add, release)")
    p.add_argument("--reason", action=Store, default="",
                   help="add: why, shown by list and in the node's registry entry and log")
    p.add_argument("--for", dest="seconds", type=float, action=Store, default=DEFAULT_FOR,
                   help="add: seconds the node sits out (default %(default)g)")
    p.add_argument("--all", dest="all", action="store_true",
                   help="list: also records that hold nobody out now (failures counted, cooldown over)")
    log_flags(p, "WARNING", "log level on stderr")
    for action in p._actions:  # noqa: SLF001 - argparse has no public list of actions
        if action.dest == "run_id" and "--run-id" in action.option_strings:
            action.help = "also list or release that run's current job's own records (scope job)"
    return p


def run_quarantine(ns: argparse.Namespace, etcd: Etcd) -> int:
    if ns.action != "list":
        if not ns.node:
            raise ConfigError(f"etcd-agent quarantine {ns.action} needs a NODE")
        if not _NODE_ID_RE.fullmatch(ns.node):
            raise ConfigError(f"NODE {ns.node!r}: use 1-128 letters, digits, '.', '_' or '-'")
    if ns.action == "add":
        return _add(ns, etcd)
    if ns.action == "release":
        return _release(ns, etcd)
    return _list(ns, etcd)


def _job_prefix(ns: argparse.Namespace, etcd: Etcd):
    """The keys of the current job of ``--run-id`` (None: no --run-id); ConfigError when the run has no job."""
    if not ns.run_id:
        return None
    keys = txns.current_job(etcd, RunKeys(ns.root, ns.run_id))
    if keys is None:
        raise ConfigError(f"--run-id {ns.run_id}: no job under {RunKeys(ns.root, ns.run_id).prefix}")
    return keys


def _add(ns: argparse.Namespace, etcd: Etcd) -> int:
    if not 0 < ns.seconds <= MAX_PERIOD:  # also NaN
        raise ConfigError(f"--for must be positive seconds, at most {MAX_PERIOD:.0f} (a year), got {ns.seconds:g}")
    q = quarantine.operator_record(ns.node, ns.reason, ns.seconds, time.time())
    etcd.put(cluster_quarantine(ns.root, ns.node), q.encode())
    print(f"{ns.node} quarantined cluster-wide until {_when(q.until)}: {q.reason} (every job skips it from its "
          "next join; running workers are not stopped)")
    return 0


def _release(ns: argparse.Namespace, etcd: Etcd) -> int:
    keys = [cluster_quarantine(ns.root, ns.node)]
    job = _job_prefix(ns, etcd)
    if job is not None:
        keys.append(job.quarantine(ns.node))
    released = [key for key in keys if etcd.delete_range(key) > 0]
    if not released:
        print(f"{ns.node} has no quarantine record to release ({', '.join(keys)})")
        return 1
    print(f"{ns.node} released ({', '.join(released)} deleted): it checks itself again and joins at once")
    return 0


def _list(ns: argparse.Namespace, etcd: Etcd) -> int:
    wall = time.time()
    sources = [("cluster", cluster_quarantines(ns.root))]
    job = _job_prefix(ns, etcd)
    if job is not None:
        sources.append((f"job {ns.run_id}", job.quarantines()))
    rows = []
    for scope, prefix in sources:
        kvs, _rev = etcd.get_prefix(prefix)
        for kv in kvs:
            try:
                q = Quarantine.from_kv(kv)
            except BadKeyData as exc:
                rows.append((kv.key[len(prefix):], scope, "-", f"not a valid record, ignored by every agent: {exc}"))
                continue
            if q.sitting_out(wall) or ns.all:
                until = _when(q.until) if q.until else "-"
                by = f" ({q.by})" if q.by else ""
                rows.append((q.node or kv.key[len(prefix):], scope, until,
                             (q.reason or f"{len(q.failures)} failure(s) counted") + by))
    if not rows:
        print("no node is quarantined" + ("" if ns.all else " (--all: also records that hold nobody out)"))
        return 0
    width = [max(len(r[i]) for r in rows + [("NODE", "SCOPE", "UNTIL", "")]) for i in range(3)]
    print(f"{'NODE':<{width[0]}}  {'SCOPE':<{width[1]}}  {'UNTIL':<{width[2]}}  REASON")
    for row in sorted(rows):
        print(f"{row[0]:<{width[0]}}  {row[1]:<{width[1]}}  {row[2]:<{width[2]}}  {row[3]}")
    return 0


def _when(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))

