"""Which job of a run an arriving agent belongs to: one try of ``txns.init_job`` (``find_job``) and the txn that
starts a run's next job (``new_generation``).

Guarantees: the run's pointer ``R/job`` fences every move, so agents that arrive together land in the same job; a
running job's spec is checked before it is joined; an ended job stays the run's job while a node of it is
registered. The job-wide keys (``Keys.control``) are read in the txn that found or started the job, so the caller
watches them from that read's revision + 1 without reading them again (``found``).

Imports the base, ``schema/``, ``etcd.client`` and ``coord/`` (``cas``, ``runs``); not ``node/``.
"""

from __future__ import annotations

import dataclasses
import json

from .. import logs
from ..config import JobSpec
from ..errors import BadKeyData, SpecMismatch
from ..etcd.client import KV, Etcd, absent, mod_is, op_get, op_get_range, op_put, unchanged_under
from ..schema.keys import Keys, RunKeys, decode
from ..schema.values import JobPointer, Phase, Restarts, Result, RoundInfo, SpecValue
from .cas import AGAIN, Again
from .runs import check_spec, first_entries, names, newcomer_end

log = logs.get("etcd_agent.coord.txns")  # the lines it logs were the txns module's: filters on that name still work


GUESS = 1  # the generation read with the run's pointer before it is known: a run's first job, the usual one


@dataclasses.dataclass(frozen=True)
class Read:
    """The run's pointer ``R/job`` (None: absent) with job ``gen``'s job-wide keys and oldest registry entries, as
    one txn read them at ``revision``: what a try of ``init_job`` decides on without reading again."""

    pointer: KV | None
    gen: int
    control: list
    entries: list
    revision: int


def find_job(etcd: Etcd, run: RunKeys, spec: JobSpec, wall: float, abandoned, join_timeout: float | None,
             read: list, found: dict | None = None) -> Keys | Again:
    """One try of ``init_job``: the job's keys, or AGAIN when another moved the run first. ``read``: the ``Read`` this
    try takes (the nested-run check's, or the failed start of a job's); when empty, it reads R/job itself."""
    first: Read | None = read.pop() if read else None
    kv = etcd.get(run.job())[0] if first is None else first.pointer
    if kv is None:
        control = new_generation(etcd, run, 1, 0, spec, wall, join_timeout=join_timeout, reread=read)
        if control is None:
            return AGAIN
        log.debug("created job spec %s: %s", run.generation(1).spec(),
                  json.dumps(SpecValue.of(spec, join_timeout).to_json(), sort_keys=True))
        _found(found, control)
        return run.generation(1)
    keys = run.generation(pointer_generation(kv))
    if first is not None and keys.gen == first.gen:
        control, entries, revision = first.control, first.entries, first.revision
    else:
        res = etcd.txn([], [op_get_range(*keys.control()), first_entries(keys)], where=f"read {keys.spec()}")
        control, entries, revision = res.ranges[0], res.ranges[1], res.revision
    job = {c.key: c for c in control}
    if keys.spec() not in job:
        raise BadKeyData(keys.spec(), f"missing, but {run.job()} names job {keys.gen} as the run's current one")
    if keys.result() not in job:
        if abandoned is not None and not unstarted(keys, job, spec) and abandoned(keys, entries):
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
    control = new_generation(etcd, run, keys.gen + 1, kv.mod_revision, spec, wall, seen, join_timeout, read)
    if control is None:
        return AGAIN
    log.info("run %s ended (%s: %s) as job %d; starting job %d of run %s", run.run_id, done.outcome,
             done.reason, keys.gen, keys.gen + 1, run.run_id)
    _found(found, control)
    return run.generation(keys.gen + 1)


def _found(found: dict | None, control: tuple[list, int]) -> None:
    if found is not None:
        found["control"] = control


def unstarted(keys: Keys, job: dict, spec: JobSpec) -> bool:
    """Whether job ``keys`` (``job``: its job-wide keys as read, by key) never started and is this agent's to join:
    its round key is still the one the txn that made the job wrote (round 1 forming, nothing closed or restarted)
    and its spec is this agent's. Such a job is never ended as abandoned on arrival: while agents start together,
    its maker is registering at that moment (each arriving agent would otherwise watch the registry for it), and
    joining a job that never started is starting it."""
    rnd, stored = job.get(keys.round()), job[keys.spec()]
    if rnd is None or rnd.mod_revision != stored.create_revision:
        return False
    try:
        check_spec(keys, spec, decode(keys.spec(), stored.value))
    except (BadKeyData, SpecMismatch):
        return False  # a dead job made with other flags (or a garbled spec) is still ended, so these can start
    return True


def new_generation(etcd: Etcd, run: RunKeys, gen: int, pointer_rev: int, spec: JobSpec, wall: float,
                   seen: int = 0, join_timeout: float | None = None,
                   reread: list | None = None) -> tuple[list, int] | None:
    """Make job ``gen`` the run's current one with its spec, round 1 and restart budget, if ``R/job`` is still at
    ``pointer_rev`` (0: absent) and no registry entry of job ``gen - 1`` was written after revision ``seen`` (the
    read that found nobody registered). Returns the new job's job-wide keys (``Keys.control``) as read back by the
    txn, with its revision; None when another agent moved the run, or registered, first: then the txn read R/job
    and job ``gen``'s keys instead, appended to ``reread`` as a ``Read`` (agents that start a run together make one
    txn each here, and the losers join the winner's job without reading again)."""
    keys = run.generation(gen)
    quiet = [unchanged_under(run.generation(gen - 1).nodes(), seen)] if gen > 1 else []
    res = etcd.txn([mod_is(run.job(), pointer_rev), absent(keys.spec()), *quiet],
                   [op_put(run.job(), JobPointer(gen, wall).encode()),
                    op_put(keys.spec(), SpecValue.of(spec, join_timeout).encode()),
                    op_put(keys.round(), RoundInfo(1, Phase.JOINING, "the job started", time=wall,
                                                   last_plan=0).encode()),
                    op_put(keys.restarts(), Restarts.of(spec).encode()), op_get_range(*keys.control())],
                   [op_get(run.job()), op_get_range(*keys.control()), first_entries(keys)],
                   where=f"start job {gen} of run {run.run_id}")
    if res.succeeded:
        return res.ranges[0], res.revision
    pointer = res.ranges[0][0] if res.ranges[0] else None
    if pointer is None and pointer_rev == 0:
        raise BadKeyData(run.job(), f"missing, but job {gen} of the run exists ({keys.spec()})")
    made = any(kv.key == keys.spec() for kv in res.ranges[1])
    if pointer is not None and pointer.mod_revision == pointer_rev and made:
        raise BadKeyData(keys.spec(), f"exists, but {run.job()} names job {gen - 1} as the run's current one")
    if reread is not None:
        reread.append(Read(pointer, gen, res.ranges[1], res.ranges[2], res.revision))
    return None


def pointer_generation(kv) -> int:
    """The generation ``R/job`` names; BadKeyData names the key when it is not a positive integer."""
    return JobPointer.from_kv(kv).gen
