"""One guarded etcd txn per rendezvous action, plus the job's first-contact txns (run pointer, spec, round,
registry, ``--node-rank`` claim).

Every txn that moves the job is guarded by the mod_revision of ``P/round`` (the fence), so two agents acting on
the same view cannot both succeed: the loser's compare fails and it re-reads and decides again. A bump also
requires that no node has written its exit key for the round, so "finished" and "restarted" can never both
happen; closing a round requires every member's join key to be the one the plan was made from. Failure reports are
written whichever branch runs: a report is never lost to a race.
Which job of a run an agent belongs to is fenced the same way, by the mod_revision of ``R/job``: starting a new
job (the first, or the next after the current one ended) is one txn guarded by it, so agents that re-run a
finished run id together all land in the same new job. An ended job stays the run's job while any node of it is
still registered (a newcomer gets its end, ``JobEnded``): the next job is started only if the ended job's registry
was not written since the read that found it empty (the checks on arrival are ``runs.py``, each try ``jobs.py``). A
read-modify-write that lost its compare reads again through ``cas.swap``, a bounded number of times.

Imports the base, ``schema/``, ``etcd/`` (client, watch), ``coord.decide``, ``blame``, ``cas``, ``jobs``,
``runs``; not ``node/``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from .. import logs
from ..config import JobSpec
from ..errors import BadKeyData, DuplicateNode, JobEnded, NodeRankTaken
from ..etcd.client import (Etcd, TxnResult, absent, created_at, mod_is, none_under, op_count, op_delete,
                           op_first_created, op_get, op_get_prefix, op_get_range, op_put, unchanged_under)
from ..schema.keys import Keys, RunKeys, prefix_end
from .blame import ReportLoss
from .cas import AGAIN, Again, swap
from .jobs import GUESS, Read, find_job, pointer_generation
from .runs import first_entries, newcomer_end, refuse_nested
from .decide import Bump, ClosePlan, End, JoinRound, WriteExit
from ..schema.values import (Exit, Failure, Join, NodeInfo, Outcome, Phase, RankClaim, Restarts, Result,
                             RoundInfo)
from ..etcd.watch import wait_deleted

log = logs.get("etcd_agent.coord.txns")


def round_value(number: int, phase: Phase, reason: str, wall: float, **extra) -> bytes:
    return RoundInfo(number, Phase(phase), reason, time=wall, **extra).encode()


def init_job(etcd: Etcd, run: RunKeys, spec: JobSpec, wall: float,
             abandoned: Callable[[Keys, list], bool] | None = None, join_timeout: float | None = None,
             found: dict | None = None, also: list[str] = ()) -> Keys:
    """Find this agent's job of the run and return its keys: the running job (its spec checked), or a new job
    when the run has none yet (generation 1) or its current job has ended and none of its nodes is registered any
    more (generation K+1, as torchrun runs a finished run id again). While a node of the ended job is still
    registered, the job stays closed: JobEnded carries its end to this agent (``newcomer_end``). Concurrent starters
    agree: every move is one txn guarded by ``R/job`` (and by the ended job's registry), retried by ``cas.swap``. A
    run nested in another run's prefix is refused first (``refuse_nested``), in a txn that also reads R/job and
    what the first job of a run would need (``GUESS``): an agent arriving at a run's running first job makes one
    read txn here. ``abandoned(keys, first)`` (``first``: the registry's oldest entries, read with the spec), asked
    about a running job before it is joined, ends it when none of its agents is left (``abandon.end_if_abandoned``)
    and says so. A new job's spec records ``join_timeout`` (``status`` tells from it when a forming round times out).

    ``found``, when given, gets the reads the caller can watch from without reading again, each as (kvs, revision
    of the read): under ``"control"`` the job's job-wide keys (``Keys.control``) as read by the txn that found or
    started the job, and under each key of ``also`` (single keys the caller reads next, such as its cluster
    quarantine record) that key as read in the first txn (absent where that txn could not be made)."""
    guess = run.generation(GUESS)
    extra = [op_get(key) for key in also]
    first = refuse_nested(etcd, run, [op_get_range(*guess.control()), first_entries(guess), *extra])
    if first is None and extra:  # a user that may not read ``also``: the nested-run check without it
        first = refuse_nested(etcd, run, [op_get_range(*guess.control()), first_entries(guess)])
    elif first is not None and found is not None:
        found.update((key, (kvs, first.revision)) for key, kvs in zip(also, first.ranges[3:]))
    read = [] if first is None else [Read(first.ranges[0][0] if first.ranges[0] else None, GUESS, first.ranges[1],
                                          first.ranges[2], first.revision)]  # a later try reads again
    return swap(lambda: find_job(etcd, run, spec, wall, abandoned, join_timeout, read, found), run.job(),
                "find the run's current job")


def run_end(etcd: Etcd, run: RunKeys) -> JobEnded | None:
    """The end an agent arriving at the run now would get (``newcomer_end``): None when the run has no job, its
    current job still runs, or nobody of its ended job is registered. Two reads, no write."""
    keys = current_job(etcd, run)
    if keys is None:
        return None
    res = etcd.txn([], [op_get(keys.result()), op_get_prefix(keys.nodes())], where=f"read {keys.result()}")
    return (newcomer_end(keys, Result.from_kv(res.ranges[0][0]), res.ranges[1], etcd.endpoints_text)
            if res.ranges[0] else None)


def current_job(etcd: Etcd, run: RunKeys) -> Keys | None:
    """The keys of the run's current job, or None when the run has none."""
    kv, _rev = etcd.get(run.job())
    return None if kv is None else run.generation(pointer_generation(kv))


def register(etcd: Etcd, keys: Keys, node: str, info: NodeInfo, lease: int) -> TxnResult:
    """Put ``P/nodes/<node>`` on our lease; another live agent with the same node id is an error. The result's
    one range is the registration as written (or as found, when a retried first attempt had applied)."""
    key = keys.node(node)
    res = etcd.txn([absent(key)], [op_put(key, info.encode(), lease), op_get(key)], [op_get(key)],
                   where=f"register {key}")
    if not res.succeeded:
        other = res.ranges[0][0]
        if other.lease != lease:
            holder = NodeInfo.from_kv(other)
            raise DuplicateNode(f"--node-id {node} is already registered by a live agent (pid {holder.pid} "
                                f"on {holder.host}, {key}); give each agent its own node id")
    return res


def update_registration(etcd: Etcd, kv, info: NodeInfo, lease: int) -> TxnResult:
    """Rewrite this node's registry entry (``kv``, as last written) with ``info``, on the same lease, if it is still
    that version; the result's one range is the entry as written."""
    return etcd.txn([mod_is(kv.key, kv.mod_revision)], [op_put(kv.key, info.encode(), lease), op_get(kv.key)],
                    where=f"update {kv.key}")


def put_quarantine(etcd: Etcd, key: str, kv, record) -> TxnResult:
    """Write this node's quarantine record if ``P/quarantine/<node>`` is still ``kv`` (None: absent). On success the
    result's one range is the record as written."""
    return etcd.txn([mod_is(key, kv.mod_revision) if kv else absent(key)], [op_put(key, record.encode()), op_get(key)],
                    where=f"count a failure in {key}")


def claim_node_rank(etcd: Etcd, keys: Keys, rank: int, claim: RankClaim, lease: int, wait: float) -> int:
    """Hold ``P/node_ranks/<rank>`` on our lease (create-if-absent), so that no two live nodes share a
    ``--node-rank``; returns the revision of the claim. A key on our own lease is ours (a retried claim whose first
    attempt applied). Another agent's claim is waited out for up to ``wait`` seconds (a holder killed just now
    loses its lease within a TTL): read, then watch the key from that revision + 1 for its delete, and claim
    again. Still held then: NodeRankTaken names the holder."""
    key = keys.node_rank(rank)
    give_up = time.monotonic() + wait
    while True:
        res = etcd.txn([absent(key)], [op_put(key, claim.encode(), lease)], [op_get(key)], where=f"claim {key}")
        if res.succeeded or res.ranges[0][0].lease == lease:
            return res.revision
        held = res.ranges[0][0]
        holder = RankClaim.from_kv(held)
        who = f"node {holder.node} (pid {holder.pid} on host {holder.host}, lease {held.lease:x})"
        left = give_up - time.monotonic()
        if left > 0:
            log.info("--node-rank %d of job %s is held by %s; waiting up to %.1f s in case that agent just died "
                     "(its lease then ends)", rank, keys.run_id, who, left)
        if left <= 0 or not wait_deleted(etcd, key, res.revision, left):
            raise NodeRankTaken(f"--node-rank {rank} is already taken by {who} in job {keys.run_id} ({key}); "
                                "give each node its own --node-rank")


LEADER_CANDIDATES = 16  # the oldest keys under a round's joins: the leader is the first that is a join key (a key
#                         planted below it, such as join/a/b, is not, and must not make "b" the leader)
JOIN_CANDIDATES = 2  # what each join reads back of them (N per round); none a join key: ``leader`` reads 16


def join(etcd: Etcd, keys: Keys, a: JoinRound, node: str, info: Join, lease: int, old_round: int) -> TxnResult:
    """Put this node's join key (and delete its key of the round it joined before). On success the result's
    ranges are [this join key, the oldest keys under the round's joins: the first join key among them leads]."""
    n = a.round.number
    ops = [op_put(keys.join(n, node), info.encode(), lease)]
    if old_round and old_round != n:
        ops.append(op_delete(keys.join(old_round, node)))
    return etcd.txn([mod_is(keys.round(), a.round.mod_revision)],
                    ops + [op_get(keys.join(n, node)), op_first_created(keys.joins(n), JOIN_CANDIDATES)],
                    where=f"join round {n}")


def leader(etcd: Etcd, keys: Keys, rnd: int) -> TxnResult:
    """The round's leader as of now: its ranges are [the oldest keys under the round's joins (the first join key
    among them leads; none: nobody has joined)]."""
    return etcd.txn([], [op_first_created(keys.joins(rnd), LEADER_CANDIDATES)], where=f"find the leader of round {rnd}")


MAX_GUARDED_MEMBERS = 100  # etcd allows 128 compares per txn


def close(etcd: Etcd, keys: Keys, a: ClosePlan, wall: float) -> TxnResult:
    """Write the plan and start the round, if the joins are still the ones the plan was made from: no join key of
    the round was written after the view (one range compare, for any number of members: a node that re-joined
    with a new session, or joined late, makes the leader decide again), and the first ``MAX_GUARDED_MEMBERS``
    members' keys are still there (etcd caps a txn at 128 compares; a member beyond them that left in between is
    found lost as soon as the round runs, and costs a restart).

    The plan's header and B parts (``schema/plan.py``) are written in this one txn, B + 4 ops (B <= 120, etcd allows
    128): a plan is whole or absent. The round records B; only the leader reads the whole plan back (O(N), once)."""
    n = a.round.number
    parts = a.plan.split()
    # The leader's own key first: a leader whose lease ended while it decided never closes a round.
    guard = sorted(a.join_revisions, key=lambda nr: nr[0] != a.plan.leader)
    members = [created_at(keys.join(n, node), rev) for node, rev in guard][:MAX_GUARDED_MEMBERS]
    seen = [unchanged_under(keys.joins(n), a.seen_revision)] if a.seen_revision else []
    return etcd.txn([mod_is(keys.round(), a.round.mod_revision), absent(keys.plan(n)), *seen, *members],
                    [op_put(keys.plan(n), a.plan.header()),
                     *(op_put(keys.plan_part(n, p.part), p.encode()) for p in parts),
                     op_put(keys.round(), round_value(n, Phase.RUNNING, a.plan.summary(), wall,
                                                      nodes=len(a.plan.members), plan_parts=len(parts),
                                                      last_plan=a.round.last_plan or 0,
                                                      scaled_for=a.round.scaled_for)),
                     op_get(keys.round()), op_get_prefix(keys.plan(n))],
                    where=f"close round {n}")


def bump(etcd: Etcd, keys: Keys, a: Bump, restarts_used: int, restarts_max: int, restarts_rev: int,
         node: str, wall: float) -> TxnResult:
    n = a.round.number
    # No key at all under the round's exits: one compare for any number of members. A key there that is no
    # member's exit (a node outside the plan, junk below the exits) fails it too: the coordinator deletes those
    # first (``Coordinator._drop_ghost_exits``), and again after a failed compare showed it new ones.
    compare = [mod_is(keys.round(), a.round.mod_revision), none_under(keys.exits(n))]
    # Round n ran (a bump always leaves a running round): its plan is who ran last.
    ops = [op_put(keys.round(), round_value(n + 1, Phase.JOINING, a.reason, wall, last_plan=n,
                                            scaled_for=a.scaled_for))]
    if a.counted:
        compare.append(mod_is(keys.restarts(), restarts_rev))
        ops.append(op_put(keys.restarts(), (a.restarts or Restarts(restarts_used + 1, restarts_max)).encode()))
    report = [op_put(keys.failure(n, node), a.failure.encode())] if a.failure else []
    reads = [op_get(keys.round()), op_get(keys.restarts())] + ([op_get(keys.failure(n, node))] if a.failure else [])
    lost, lost_ops = _losses(keys, n, a.losses)
    return etcd.txn(compare + lost, ops + report + lost_ops + reads, report, where=f"restart round {n} -> {n + 1}")


def _losses(keys: Keys, rnd: int, reports) -> tuple[list, list]:
    """The compares and puts that write loss reports under round ``rnd``'s failures, each only where the node has
    no report (its own, or one written already): a failed compare re-reads the round's failures."""
    return ([absent(keys.failure(rnd, f.node)) for f in reports],
            [op_put(keys.failure(rnd, f.node), f.encode()) for f in reports])


def report_loss(etcd: Etcd, keys: Keys, a: ReportLoss) -> TxnResult:
    """Write the loss reports of ``a`` under their round's failures, once: only if none of those nodes has a report
    there (its own, or another agent's loss report). Either way the result's ranges are those keys as they are now."""
    rnd = a.reports[0].round
    compare, ops = _losses(keys, rnd, a.reports)
    reads = [op_get(keys.failure(rnd, f.node)) for f in a.reports]
    return etcd.txn(compare, ops + reads, reads, where=f"report the loss of {', '.join(f.node for f in a.reports)}")


MAX_STRAYS = 100  # etcd allows 128 compares per txn: more stray keys are deleted over more bumps


def delete_strays(etcd: Etcd, kvs: list) -> TxnResult:
    """Delete keys that nothing should hold (the first ``MAX_STRAYS`` of ``kvs``), each only if it is still the
    version read."""
    kvs = kvs[:MAX_STRAYS]
    return etcd.txn([mod_is(kv.key, kv.mod_revision) for kv in kvs], [op_delete(kv.key) for kv in kvs],
                    where=f"delete {len(kvs)} stray key(s)")


def report_failure(etcd: Etcd, keys: Keys, rnd: int, node: str, failure: Failure) -> None:
    """A failure seen while the round was already moving on: recorded if the node has no report for it yet."""
    key = keys.failure(rnd, node)
    etcd.txn([absent(key)], [op_put(key, failure.encode())], where=f"report failure {key}")


def write_exit(etcd: Etcd, keys: Keys, a: WriteExit, node: str, wall: float) -> TxnResult:
    n = a.round.number
    # The exit barrier: each node counts the exits (O(1) bytes); one that counts as many as the plan has members
    # reads them (O(N), once) and ends the job if they are every member's.
    res = etcd.txn([mod_is(keys.round(), a.round.mod_revision)],
                   [op_put(keys.exit(n, node), Exit(node, Outcome.SUCCEEDED, wall).encode()),
                    op_get(keys.exit(n, node)), op_count(keys.exits(n)) if a.members else op_get_prefix(keys.exits(n))],
                   where=f"exit barrier of round {n}")
    if res.succeeded and a.members and res.counts[1] >= a.members:
        res.ranges[1] = etcd.get_prefix(keys.exits(n))[0]
    return res


def end(etcd: Etcd, keys: Keys, a: End, node: str, wall: float) -> TxnResult:
    r: RoundInfo = a.round
    report = [op_put(keys.failure(r.number, node), a.failure.encode())] if a.failure else []
    nobody = [none_under(keys.joins(r.number))] if a.unjoined else []  # a timeout decided outside the round
    lost, lost_ops = _losses(keys, r.number, a.losses)
    return etcd.txn([mod_is(keys.round(), r.mod_revision), absent(keys.result()), *nobody, *lost],
                    [op_put(keys.round(), round_value(r.number, a.phase, a.result.reason, wall)),
                     op_put(keys.result(), a.result.encode())] + report + lost_ops
                    + [op_get(keys.round()), op_get(keys.result())], report, where=f"end the job in round {r.number}")


def stop_job(etcd: Etcd, keys: Keys, reason: str, wall: float) -> bool:
    """The operator's ``etcd-agent stop``: end the job ``stopped`` unless it already has a result."""
    return close_job(etcd, keys, "stopped", reason, wall)


@dataclasses.dataclass(frozen=True)
class Hold:
    """A registry entry that keeps a closed job closed to newcomers (``init_job``) while its holder lives:
    ``value`` put at ``key`` on ``lease`` in the txn that ends the job (torchrun's ``set_closed``). An entry found
    there is replaced only when it is on ``replaces`` (this node's agent's session, whose lease ends when that agent
    exits) or has no lease; another live agent's is left alone (it keeps the job closed while it lives)."""

    key: str
    value: bytes
    lease: int
    replaces: int = 0


def _holding(hold: Hold | None, found: list) -> tuple[list, list]:
    """The compare and the put that take ``hold`` in the ending txn, given the entry ``found`` at its key."""
    if hold is None:
        return [], []
    current = found[0] if found else None
    if current is not None and current.lease not in (0, hold.lease, hold.replaces):
        return [], []
    return [mod_is(hold.key, current.mod_revision if current else 0)], [op_put(hold.key, hold.value, hold.lease)]


def close_job(etcd: Etcd, keys: Keys, outcome: str, reason: str, wall: float, root_cause: Failure | None = None,
              node: str | None = None, hold: Hold | None = None, guards: list = ()) -> bool:
    """End the job ``stopped`` or ``failed`` unless it already has a result (``etcd-agent stop``; torchrun's
    backend closing the rendezvous). ``root_cause``, a failure report of ``node``, goes into the result and under
    the round's failures; ``hold``, a registry entry, is written in the same txn. False when the job had ended
    already, or when one of the caller's ``guards`` (compares) failed: the caller decides again. Every agent of the
    job reacts through its watch.
    A round key that is not a valid value (written by hand, say) does not keep a job from being stopped: it is
    replaced by the final round, numbered after the newest round with keys under ``P/r/``."""
    outcome = Outcome(outcome)
    if outcome not in (Outcome.STOPPED, Outcome.FAILED):
        raise ValueError(f"a job is closed stopped or failed, not {outcome!r}")

    def attempt() -> bool | Again:
        got = etcd.txn([], [op_get(keys.round())] + ([op_get(hold.key)] if hold else []), where=f"read {keys.round()}")
        kv = got.ranges[0][0] if got.ranges[0] else None
        if kv is None:
            raise BadKeyData(keys.round(), f"no such key: is {keys.run_id} a job under {keys.root}?")
        try:
            number = RoundInfo.from_kv(kv).number
        except BadKeyData as exc:
            number = keys.newest_round(etcd.keys_in_range(keys.rounds(), prefix_end(keys.rounds())))
            log.warning("%s; ending the job in round %d and replacing the key with a valid one", exc, number)
        result = Result(outcome, number, reason, root_cause, time=wall)
        report = [op_put(keys.failure(number, node), root_cause.encode())] if root_cause and node else []
        held, hold_ops = _holding(hold, got.ranges[1] if hold else [])
        res = etcd.txn([mod_is(keys.round(), kv.mod_revision), absent(keys.result()), *held, *guards],
                       [op_put(keys.round(), round_value(number, Phase(outcome.value), reason, wall)),
                        op_put(keys.result(), result.encode())] + report + hold_ops, [op_get(keys.result())],
                       where=f"end the job {outcome}")
        if res.succeeded:
            return True
        if (res.ranges and res.ranges[0]) or guards:
            return False  # it already ended, or the caller's condition no longer holds
        return AGAIN

    return swap(attempt, keys.round(), f"end the job {outcome}")


def hold_ended(etcd: Etcd, keys: Keys, hold: Hold) -> bool:
    """Take ``hold`` for job ``keys``, which has ended already, if it is still the run's current job (a new job of
    the run is never closed by it). False when the run moved on, or another live agent holds the key."""
    run = keys.run
    got = etcd.txn([], [op_get(run.job()), op_get(hold.key)], where=f"read {run.job()}")
    pointer = got.ranges[0][0] if got.ranges[0] else None
    held, hold_ops = _holding(hold, got.ranges[1])
    if pointer is None or pointer_generation(pointer) != keys.gen or not hold_ops:
        return False
    return etcd.txn([mod_is(run.job(), pointer.mod_revision), *held], hold_ops, where=f"hold {hold.key}").succeeded
