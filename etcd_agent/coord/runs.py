"""The checks that keep a run's jobs apart when an agent arrives (``txns.init_job`` runs them): a run nested in
another run's prefix is refused, an agent whose spec differs from the running job's is refused naming each flag,
and a newcomer to a run whose job ended while a node of it is still registered gets that job's end.

Guarantees: every refusal is an error that names the key or flag (ConfigError, SpecMismatch, JobEnded); nothing
here writes. Imports the base modules, ``schema/`` and ``etcd.client``; never ``node/``.
"""

from __future__ import annotations

from ..config import JobSpec
from ..errors import ConfigError, EtcdAuthError, JobEnded, SpecMismatch
from ..etcd.client import Etcd, op_get
from ..schema.keys import Keys, RunKeys
from ..schema.values import Result, SpecValue

NAMED_NODES = 8  # registered nodes of an ended job a log line names (the count is always given)


def names(nodes: list[str]) -> str:
    """The first ``NAMED_NODES`` of ``nodes``, and how many more there are."""
    more = f" and {len(nodes) - NAMED_NODES} more" if len(nodes) > NAMED_NODES else ""
    return ", ".join(nodes[:NAMED_NODES]) + more


def newcomer_end(keys: Keys, done: Result, registry: list) -> JobEnded | None:
    """What an agent arriving at the run gets instead of a new job while job ``keys`` has ended (``done``) and
    ``registry`` (the job's ``P/nodes/`` as read) still holds a live node: an agent still in its exit, or
    torchrun's handler that closed the rendezvous and was not shut down. None when nobody is left (an entry without
    a lease is no live agent's)."""
    nodes = [kv.key[len(keys.nodes()):] for kv in registry if kv.lease]
    return JobEnded(done.ended(keys.run_id, already=True), done.outcome.value, nodes) if nodes else None


def refuse_nested(etcd: Etcd, run: RunKeys) -> None:
    """A run whose prefix lies inside another run's (``--etcd-prefix`` pointing into a job) would leave keys that
    job's agents trip over: refuse it before anything is written, naming the run it is inside."""
    prefix = run.prefix
    ancestors = [prefix[: i + 1] for i, ch in enumerate(prefix[:-1]) if ch == "/" and i > 0]
    if not ancestors:
        return
    try:
        res = etcd.txn([], [op_get(a + "job") for a in ancestors], where=f"check that {prefix} is not inside a run")
    except EtcdAuthError:
        return  # a user limited to its own run's keys may not read above them (and cannot write there either)
    for a, found in zip(ancestors, res.ranges):
        if found:
            raise ConfigError(f"--etcd-prefix {run.root}: run {run.run_id} would live inside the run at {a} "
                              f"({a}job names its current job); choose a prefix outside every run's keys")


_SPEC_FLAGS = {"min_nodes": "--nnodes (minimum)", "max_nodes": "--nnodes (maximum)",
               "nproc_per_node": "--nproc-per-node", "max_restarts": "--max-restarts"}


def check_spec(keys: Keys, spec: JobSpec, stored: dict) -> None:
    """``stored`` (the decoded ``P/spec``) against this agent's spec: SpecMismatch names each flag that differs."""
    theirs, ours = SpecValue.from_json(keys.spec(), stored).to_json(), SpecValue.of(spec).to_json()
    diffs = [f"{flag} is {ours[k]!r} here but {theirs[k]!r} in the running job"
             for k, flag in _SPEC_FLAGS.items() if ours[k] != theirs[k]]
    if diffs:
        raise SpecMismatch(f"this agent does not match job {keys.run_id} ({keys.spec()}): " + "; ".join(diffs))
