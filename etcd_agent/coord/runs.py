"""The checks that keep a run's jobs apart when an agent arrives (``txns.init_job`` runs them): a run nested in
another run's prefix is refused, an agent whose spec differs from the running job's is refused naming each flag,
and a newcomer to a run whose job ended while a node of it is still registered gets that job's end.

Guarantees: every refusal is an error that names the key or flag (ConfigError, SpecMismatch, JobEnded) and ends with
the fix: how the run id is freed (``etcd-agent stop``, or waiting for the registered nodes), or another
``--run-id``; nothing here writes. Imports the base modules, ``schema/`` and ``etcd.client``; never ``node/``.
"""

from __future__ import annotations

import dataclasses

from ..config import DEFAULT_ROOT, JobSpec
from ..errors import ConfigError, EtcdAuthError, JobEnded, SpecMismatch
from ..etcd.client import Etcd, TxnResult, op_first_created, op_get
from ..schema.keys import Keys, RunKeys
from ..schema.values import Result, SpecValue

NAMED_NODES = 8  # registered nodes of an ended job a log line names (the count is always given)
FIRST_ENTRIES = 8  # registry entries read first when asking whether a job is abandoned: any live one settles it


def names(nodes: list[str]) -> str:
    """The first ``NAMED_NODES`` of ``nodes``, and how many more there are."""
    more = f" and {len(nodes) - NAMED_NODES} more" if len(nodes) > NAMED_NODES else ""
    return ", ".join(nodes[:NAMED_NODES]) + more


def command(verb: str, keys: Keys | RunKeys, where: str) -> str:
    """``etcd-agent VERB --run-id RUN --etcd-endpoints WHERE`` (with ``--etcd-prefix`` when the root is not the
    default): the command line an operator runs on this run."""
    root = "" if keys.root == DEFAULT_ROOT else f" --etcd-prefix {keys.root}"
    return f"etcd-agent {verb} --run-id {keys.run_id} --etcd-endpoints {where}{root}"


def newcomer_end(keys: Keys, done: Result, registry: list, where: str = "HOST:PORT") -> JobEnded | None:
    """What an agent arriving at the run gets instead of a new job while job ``keys`` has ended (``done``) and
    ``registry`` (the job's ``P/nodes/`` as read) still holds a live node: an agent still in its exit, or
    torchrun's handler that closed the rendezvous and was not shut down. None when nobody is left (an entry without
    a lease is no live agent's). The message is the job's end, then how to start anew (``where``: the etcd
    endpoints, for the command it names)."""
    nodes = [kv.key[len(keys.nodes()):] for kv in registry if kv.lease]
    if not nodes:
        return None
    one = len(nodes) == 1
    fix = (f"; {names(nodes)} of that job {'is' if one else 'are'} still registered (an agent still exiting, or a "
           f"torchrun handler not shut down): the run id starts a new job once {'it has' if one else 'they have'} "
           f"left (`{command('status', keys, where)}` shows {'it' if one else 'them'}), or give another --run-id")
    return JobEnded(done.ended(keys.run_id, already=True) + fix, done.outcome.value, nodes)


def first_entries(keys: Keys):
    """The read of job ``keys``' oldest ``FIRST_ENTRIES`` registry entries: a live one says it is not abandoned."""
    return op_first_created(keys.nodes(), FIRST_ENTRIES)


def refuse_nested(etcd: Etcd, run: RunKeys, also: list = ()) -> TxnResult | None:
    """A run whose prefix lies inside another run's (``--etcd-prefix`` pointing into a job) would leave keys that
    job's agents trip over: refuse it before anything is written, naming the run it is inside. The same txn reads
    the run's own job pointer (``R/job``), which the caller reads next, and ``also`` (range ops the caller would
    make next, so that an arriving agent's first reads are one txn): the result's ranges are [R/job as read ([]
    absent, [kv]), then one per op of ``also``], all at the result's revision; None where the txn could not be
    made."""
    prefix = run.prefix
    ancestors = [prefix[: i + 1] for i, ch in enumerate(prefix[:-1]) if ch == "/" and i > 0]
    try:
        res = etcd.txn([], [op_get(a + "job") for a in ancestors] + [op_get(run.job()), *also],
                       where=f"check that {prefix} is not inside a run")
    except EtcdAuthError:
        return None  # a user limited to its own run's keys may not read above them (and cannot write there either)
    for a, found in zip(ancestors, res.ranges):
        if found:
            raise ConfigError(f"--etcd-prefix {run.root}: run {run.run_id} would live inside the run at {a} "
                              f"({a}job names its current job); choose a prefix outside every run's keys")
    return dataclasses.replace(res, ranges=res.ranges[len(ancestors):], counts=res.counts[len(ancestors):])


_SPEC_FLAGS = {"min_nodes": "--nnodes (minimum)", "max_nodes": "--nnodes (maximum)",
               "nproc_per_node": "--nproc-per-node", "max_restarts": "--max-restarts"}


def check_spec(keys: Keys, spec: JobSpec, stored: dict, where: str = "HOST:PORT") -> None:
    """``stored`` (the decoded ``P/spec``) against this agent's spec: SpecMismatch names each flag that differs, then
    the fix (``where``: the etcd endpoints, for the stop command it names)."""
    theirs, ours = SpecValue.from_json(keys.spec(), stored).to_json(), SpecValue.of(spec).to_json()
    diffs = [f"{flag} is {ours[k]!r} here but {theirs[k]!r} in the running job"
             for k, flag in _SPEC_FLAGS.items() if ours[k] != theirs[k]]
    if diffs:
        raise SpecMismatch(f"this agent does not match job {keys.run_id} ({keys.spec()}): " + "; ".join(diffs)
                           + f"; to start a new job with these flags, stop that one (`{command('stop', keys, where)}`)"
                           " or give another --run-id")
