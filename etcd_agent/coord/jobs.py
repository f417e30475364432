"""Which job of a run an arriving agent belongs to: one try of ``txns.init_job`` (``find_job``) and the txn that
starts a run's next job (``new_generation``).

Guarantees: the run's pointer ``R/job`` fences every move, so agents that arrive together land in the same job; a
running job's spec is checked before it is joined; an ended job stays the run's job while a node of it is
registered. The job-wide keys (``Keys.control``) are read in the txn that found or started the job, so the caller
watches them from that read's revision + 1 without reading them again (``found``).

Imports the base, ``schema/``, ``etcd.client`` and ``coord/`` (``cas``, ``runs``); not ``node/``.
"""

from __future__ import annotations

import json

from .. import logs
from ..config import JobSpec
from ..errors import BadKeyData
from ..etcd.client import Etcd, TxnResult, absent, mod_is, op_get, op_get_range, op_put, unchanged_under
from ..schema.keys import Keys, RunKeys, decode
from ..schema.values import JobPointer, Phase, Restarts, Result, RoundInfo, SpecValue
from .cas import AGAIN, Again
from .runs import check_spec, first_entries, names, newcomer_end

log = logs.get("etcd_agent.coord.txns")  # the lines it logs were the txns module's: filters on that name still work


GUESS = 1  # the generation read with the run's pointer before it is known: a run's first job, the usual one


def find_job(etcd: Etcd, run: RunKeys, spec: JobSpec, wall: float, abandoned, join_timeout: float | None,
              first: TxnResult | None = None, found: dict | None = None) -> Keys | Again:
    """One try of ``init_job``: the job's keys, or AGAIN when another moved the run first (``first``: the txn that
    read R/job, then job ``GUESS``'s job-wide keys and oldest registry entries)."""
    kv = etcd.get(run.job())[0] if first is None else (first.ranges[0][0] if first.ranges[0] else None)
    if kv is None:
        control = new_generation(etcd, run, 1, 0, spec, wall, join_timeout=join_timeout)
        if control is None:
            return AGAIN
        log.debug("created job spec %s: %s", run.generation(1).spec(),
                  json.dumps(SpecValue.of(spec, join_timeout).to_json(), sort_keys=True))
        _found(found, control)
        return run.generation(1)
    keys = run.generation(pointer_generation(kv))
    if first is not None and keys.gen == GUESS:
        control, entries, revision = first.ranges[1], first.ranges[2], first.revision
    else:
        res = etcd.txn([], [op_get_range(*keys.control()), first_entries(keys)], where=f"read {keys.spec()}")
        control, entries, revision = res.ranges[0], res.ranges[1], res.revision
    job = {c.key: c for c in control}
    if keys.spec() not in job:
        raise BadKeyData(keys.spec(), f"missing, but {run.job()} names job {keys.gen} as the run's current one")
    if keys.result() not in job:
        if abandoned is not None and abandoned(keys, entries):
            return AGAIN  # nobody was left in it and it is ended now: the run's next job starts
        check_spec(keys, spec, decode(keys.spec(), job[keys.spec()].value), etcd.endpoints_text)
        _found(found, (control, revision))
        return keys
    done = Result.from_kv(job[keys.result()])
    registry, seen = etcd.get_prefix(keys.nodes())  # read only for an ended job: a running one's can be large
    ended = newcomer_end(keys, done, registry, etcd.endpoints_text)
    if ended is not None:
        log.warning("job %d of run %s ended (%s) and %d of its nodes %s still registered (%s): this agent does "
                    "not start a new job, it ends as that job did; start it again once they are gone to run "
                    "the job anew", keys.gen, run.run_id, done.outcome, len(ended.registered),
                    "is" if len(ended.registered) == 1 else "are", names(ended.registered))
        raise ended
    control = new_generation(etcd, run, keys.gen + 1, kv.mod_revision, spec, wall, seen, join_timeout)
    if control is None:
        return AGAIN
    log.info("run %s ended (%s: %s) as job %d; starting job %d of run %s", run.run_id, done.outcome,
             done.reason, keys.gen, keys.gen + 1, run.run_id)
    _found(found, control)
    return run.generation(keys.gen + 1)


def _found(found: dict | None, control: tuple[list, int]) -> None:
    if found is not None:
        found["control"] = control


def new_generation(etcd: Etcd, run: RunKeys, gen: int, pointer_rev: int, spec: JobSpec, wall: float,
                    seen: int = 0, join_timeout: float | None = None) -> tuple[list, int] | None:
    """Make job ``gen`` the run's current one with its spec, round 1 and restart budget, if ``R/job`` is still at
    ``pointer_rev`` (0: absent) and no registry entry of job ``gen - 1`` was written after revision ``seen`` (the
    read that found nobody registered). Returns the new job's job-wide keys (``Keys.control``) as read back by the
    txn, with its revision; None when another agent moved the run, or registered, first."""
    keys = run.generation(gen)
    quiet = [unchanged_under(run.generation(gen - 1).nodes(), seen)] if gen > 1 else []
    res = etcd.txn([mod_is(run.job(), pointer_rev), absent(keys.spec()), *quiet],
                   [op_put(run.job(), JobPointer(gen, wall).encode()),
                    op_put(keys.spec(), SpecValue.of(spec, join_timeout).encode()),
                    op_put(keys.round(), RoundInfo(1, Phase.JOINING, "the job started", time=wall,
                                                   last_plan=0).encode()),
                    op_put(keys.restarts(), Restarts.of(spec).encode()), op_get_range(*keys.control())],
                   [op_get(run.job()), op_get(keys.spec())], where=f"start job {gen} of run {run.run_id}")
    if res.succeeded:
        return res.ranges[0], res.revision
    pointer = res.ranges[0][0] if res.ranges[0] else None
    if pointer is None and pointer_rev == 0:
        raise BadKeyData(run.job(), f"missing, but job {gen} of the run exists ({keys.spec()})")
    if pointer is not None and pointer.mod_revision == pointer_rev and res.ranges[1]:
        raise BadKeyData(keys.spec(), f"exists, but {run.job()} names job {gen - 1} as the run's current one")
    return None


def pointer_generation(kv) -> int:
    """The generation ``R/job`` names; BadKeyData names the key when it is not a positive integer."""
    return JobPointer.from_kv(kv).gen
