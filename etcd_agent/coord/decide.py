"""Rendezvous and job lifecycle decisions: ``decide(view, local, params) -> Action``, pure and I/O free.

The agent turns each action into one guarded txn (``txns.py``) or one local step; a failed compare means "re-read
and decide again". Invariants this module keeps:
- Round leader: the joiner with the lowest join create_revision (etcd's election pattern). Only it closes a
  round: at once with ``max_nodes`` joiners; at once with ``min_nodes`` when the job ran before and every
  registered node has joined (the fast path that makes a re-rendezvous after a failure immediate); otherwise
  ``last_call`` seconds after ``min_nodes`` was reached. Fewer than ``min_nodes``, or ranks still missing, at
  ``join_timeout`` fails the job (``RendezvousTimeout``).
- Ranks (``ranks.py``): a pinned node (``--node-rank k``) has group rank k in every plan, the others keep a stable
  order; while a pin is >= the number of members the plan would have, the leader waits instead of closing (the
  timeout names the missing ranks). The leased claim ``P/node_ranks/<k>`` keeps two live nodes from sharing a pin.
  The master is group rank 0: the ``--master-addr``/``--master-port`` its join record carries, else its address
  and the port it found free.
- A plan member is lost when its leased join key vanishes without an exit key: a new session of the same node id
  can never hide the loss of the old one. An agent that fenced itself sees its own old join key (another lease)
  as lost too, so it never starts workers into a plan made with its old session.
- Views may be partial (``View.scope``): a loss counts only where the view watches it (the leader watches every
  member, the others their ring predecessor); only the leader times a round out, closes it or scales up; an
  absence the view does not watch is never read as a fact.
- Health: a node whose health check failed (``health.py``) does not join until it passes again; its registry entry
  says why, and the leader's fast path and scale-up count healthy nodes only, so nobody waits for it. A node with a
  check to pass registers ``checking`` and counts only once one passed (it checks while the job runs without it),
  so a slow check never makes the leader scale up for a node that cannot join yet. An unhealthy node outside a
  forming round watches it (``Coordinator.maintain``): when nobody joined by the join timeout, it fails the job.
- Scale-ups: one is made for the newcomers registered as of a revision (``RoundInfo.scaled_for``); one that did
  not admit a node is not repeated for it until its registry entry changes (a live node that passes its check
  again says so by writing it), so a forged or stuck registration costs one uncounted restart, not one per round.
- Restarts are counted job-wide: worker failures and node losses count, scale-ups do not; one past the budget ends
  the job (``RestartBudgetSpent``), and so do K restarts in a row with no new step (``stall.py``). Once any node's
  workers have finished, a failure ends the job ``failed``: a partly finished job cannot be re-run. ``job_error``
  names the error an agent raises for the job's result.
- Blame (``blame.py``): a node lost within a lease TTL of its round's failures is that round's cause. A full view
  writes the loss report (``ReportLoss``) of a member of the last plan lost after its round restarted; a restart for
  a loss writes the lost nodes' reports with it. A loss and the failures it caused are one restart.

Pure: no I/O, time passed in. Imports ``errors``, ``schema.values`` and ``coord/`` (``mirror``, ``blame``,
``members``, ``ranks``, ``stall``) only; never ``etcd/`` or ``node/``.
"""

from __future__ import annotations

import dataclasses
import re

from . import blame, stall
from .blame import Attribute, ReportLoss
from ..errors import JobFailed, JobStopped, RendezvousTimeout, RestartBudgetSpent
from .mirror import DONE, FAILED, FINAL_PHASES, JOINING, View
from .members import healthy, lost_members, member_exits, newcomers, passed_over, stale_join  # noqa: F401 (observe)
from .ranks import Ranking, as_spares, make_plan, rank_round
from ..schema.values import Failure, Member, Outcome, Phase, Plan, Restarts, Result, RoundInfo
MAX_LOSS_REPORTS = 40  # per txn (a compare, a put and a read each; etcd takes 128): the rest go in the next one


@dataclasses.dataclass(frozen=True)
class Params:
    min_nodes: int
    max_nodes: int
    max_restarts: int
    last_call: float
    join_timeout: float
    scale_settle: float
    lease_ttl: float = 5.0  # how soon a dead node's lease ends: a loss that near a failure is blamed for it
    no_restart_exit_code: int | None = None  # a worker that exits with it ends the job failed (None: off)


@dataclasses.dataclass(frozen=True)
class Local:
    """What only this agent knows: its workers and its timers (monotonic seconds)."""

    node: str
    now: float
    wall: float
    round: int = 0  # the round this agent is in: the newest it has seen (``observe``; its log lines say it)
    workers_round: int = 0  # the round whose workers run or ran here (0: none)
    workers_running: bool = False
    outcome: Outcome | None = None  # succeeded / failed once known for workers_round
    failure: Failure | None = None  # this node's failure report when outcome is failed
    lease: int = 0  # this agent's current session lease: join keys of an older session of this node are stale
    round_seen_at: float = 0.0  # when this agent first saw the current round number
    min_reached_at: float | None = None  # when this agent first saw min_nodes joiners in the current round
    newcomers_since: float | None = None  # when this agent first saw a registered node outside the plan
    lost_since: float | None = None  # when this agent first saw a member of the running round lost (``LOSS_END_GRACE``)
    unhealthy: str = ""  # why this node failed its last health check ("" healthy): it does not join
    health_retry_at: float = 0.0  # when an unhealthy node checks itself again
    checking: bool = False  # its health check runs (off the loop): it joins when the verdict is in
    ready: bool = True  # a health check passed since it registered (False: it checks before it is counted)
    draining: bool = False  # the GPU memory drain of its last workers runs (off the loop): nothing starts yet
    pending: Failure | None = None  # its failure that restarted the job, until it is known whether it counts
    step: int | None = None  # the latest training step of its workers in workers_round (None: none reported)


@dataclasses.dataclass(frozen=True)
class Wait:
    why: str
    deadline: float | None = None  # monotonic; None: until something changes
    timeout_at: float | None = None  # when the forming round times out (--join-timeout), for the log; None: not timed


@dataclasses.dataclass(frozen=True)
class StopWorkers:
    why: str
    cause: str = ""  # a new round's reason, for the log line that leaves the round


@dataclasses.dataclass(frozen=True)
class StartWorkers:
    plan: Plan
    member: Member


@dataclasses.dataclass(frozen=True)
class JoinRound:
    round: RoundInfo


@dataclasses.dataclass(frozen=True)
class ClosePlan:
    round: RoundInfo
    plan: Plan
    join_revisions: tuple[tuple[str, int], ...] = ()  # (member, create_revision of its join key): the txn's guard
    seen_revision: int = 0  # the view's revision: no join key may have been written after it


@dataclasses.dataclass(frozen=True)
class Bump:
    round: RoundInfo
    reason: str
    counted: bool
    failure: Failure | None = None
    scaled_for: int | None = None  # a scale-up: the newest registry revision of the newcomers it is made for
    losses: tuple[Failure, ...] = ()  # loss reports of the lost members (a restart for a loss)
    restarts: Restarts | None = None  # a counted restart: the budget after it, the no-progress count with it (stall)


@dataclasses.dataclass(frozen=True)
class CheckHealth:
    """A node outside the running round checks itself (again): an unhealthy one when its retry is due, one that has
    not passed a check yet at once; passing, it counts for the next round. ``announce``: a scale-up passed it over, so
    a pass is written into its registry entry even if nothing else changed there (the leader scales up for it again)."""

    round: RoundInfo
    announce: bool = False


@dataclasses.dataclass(frozen=True)
class WriteExit:
    round: RoundInfo
    members: int = 0  # the plan's members: the exit txn reads the exits back once it counts that many (0: always)


@dataclasses.dataclass(frozen=True)
class End:
    round: RoundInfo
    phase: Phase
    result: Result
    failure: Failure | None = None
    unjoined: bool = False  # a join timeout decided by a node that did not join: only if nobody joined the round
    losses: tuple[Failure, ...] = ()  # loss reports of the lost members (an end for a loss)


@dataclasses.dataclass(frozen=True)
class Finish:
    result: Result


Action = (Wait | StopWorkers | StartWorkers | JoinRound | ClosePlan | Bump | WriteExit | End | Finish | CheckHealth
          | ReportLoss | Attribute)


def decide(v: View, me: Local, p: Params) -> Action:
    r = v.round
    if v.result is not None:
        return StopWorkers("the job ended") if me.workers_running else Finish(v.result)
    if r is None:
        return Wait("the job's round key is not there yet")
    if r.phase in FINAL_PHASES:
        return Wait(f"round {r.number} is {r.phase}; waiting for its result key")
    if me.workers_running and me.workers_round != r.number:
        return StopWorkers(f"round {r.number} began", r.reason or "no reason given")
    if me.outcome == Outcome.SUCCEEDED and me.workers_round < r.number:
        return End(r, FAILED, result(r, FAILED, me.wall, v, f"round {me.workers_round} was restarted ({r.reason}) "
                                     f"after the workers of {me.node} had finished; a partly finished job "
                                     "cannot be re-run"))
    if p.no_restart_exit_code is not None and me.outcome == Outcome.FAILED and me.failure is not None \
            and me.failure.exitcode == p.no_restart_exit_code:  # its round may have moved on (a peer bumped first)
        return end_failed(v, r, me.wall, f"{describe_failure(me.failure)} in round {me.workers_round}; exit code "
                          f"{p.no_restart_exit_code} is the --no-restart-exit-code: not restarted", me.failure)
    blamed = _blame(v, r, me, p)
    if blamed is not None:
        return blamed
    if r.phase == JOINING:
        return _joining(v, r, me, p)
    return _running(v, r, me, p)


def _blame(v: View, r: RoundInfo, me: Local, p: Params) -> Action | None:
    """Loss reports for the last plan's round first; then, for a node whose failure restarted the job, whether it
    counts toward its quarantine (it joins nothing until that is known: ``blame.verdict``)."""
    lost = blame.unreported_losses(v, me.wall, p.lease_ttl)
    if lost:
        return ReportLoss(tuple(blame.loss_report(n, v.last_plan.round, me.wall) for n in lost[:MAX_LOSS_REPORTS]))
    f = me.pending
    if f is None or f.round is None or f.round >= r.number or (v.plan and v.plan.member(me.node)):
        return None
    counted = blame.verdict(v, f, me.wall, p.lease_ttl)
    if counted is None:
        due = me.now + max(0.0, f.time + blame.window(p.lease_ttl) - me.wall)
        return Wait(f"waiting to know whether round {f.round}'s failure was caused by a lost node before joining", due)
    return Attribute(f, counted)


def _joining(v: View, r: RoundInfo, me: Local, p: Params) -> Action:
    if me.node not in v.joins or stale_join(v, me.node, me.lease):
        return _outside(v, r, me, p)
    if not v.full:  # only the leader watches the joins; this node watches the leader's key
        others = [j for j in v.joins.values() if j.node != me.node]
        leader = min(others, key=lambda j: j.create_revision).node if others else "the round's first joiner"
        return Wait(f"joined round {r.number}; {leader} leads it")
    count = len(v.joins)
    timeout_at = me.round_seen_at + p.join_timeout
    # Below MIN the ranking is not needed (the leader sees every join: it must not sort them all each time).
    joins = as_spares(v, p)
    ranking = rank_round(v, p, joins) if count >= p.min_nodes or me.now >= timeout_at \
        else None
    waiting = count < p.min_nodes or bool(ranking.blocked)  # the round cannot close yet: the join timeout runs
    if waiting and me.now >= timeout_at:
        return End(r, FAILED, result(r, FAILED, me.wall, v, _timed_out(v, r, p, ranking)))
    leader = min(v.joins.values(), key=lambda j: j.create_revision)
    if leader.node != me.node:
        at = timeout_at if waiting else None
        return Wait(f"joined round {r.number}; {leader.node} leads it", at, at)
    if count < p.min_nodes:
        return Wait(f"round {r.number} has {count} of {p.min_nodes} node(s)", timeout_at, timeout_at)
    if ranking.blocked:
        return Wait(f"round {r.number} has {count} node(s) but cannot close yet: {ranking.blocked}", timeout_at,
                    timeout_at)
    plan = dataclasses.replace(make_plan(r.number, ranking, p, v.restarts.used if v.restarts else 0), leader=me.node)
    guard = tuple((m.node, v.joins[m.node].create_revision) for m in plan.members)
    # Fast path, for re-rendezvous only: a job that ran before closes as soon as every registered node joined.
    # The first round waits out the last call for nodes that are still starting.
    regulars = sum(1 for j in joins if not j.spare)
    if regulars >= p.max_nodes or (v.last_plan is not None and healthy(v) <= set(v.joins)):
        return ClosePlan(r, plan, guard, v.revision)
    close_at = (me.min_reached_at if me.min_reached_at is not None else me.now) + p.last_call
    if me.now >= close_at:
        return ClosePlan(r, plan, guard, v.revision)
    return Wait(f"round {r.number} has {count} node(s); last call for others", close_at)


def _outside(v: View, r: RoundInfo, me: Local, p: Params) -> Action:
    """A forming round this node has not joined: it joins, unless its health check runs or failed. An unhealthy node
    watches the round (a full view): if nobody joined it by the join timeout, it fails the job, naming the
    unhealthy nodes (a joiner would lead the round and time it out itself)."""
    if me.node not in v.nodes:
        return Wait("this node's registration is not visible yet")
    timeout_at = me.round_seen_at + p.join_timeout
    nobody = v.full and not v.joins  # (the End's txn is guarded by that: no key under the round's joins)
    if me.unhealthy and nobody and me.now >= timeout_at:
        return End(r, FAILED, result(r, FAILED, me.wall, v, _timed_out(v, r, p, None)), unjoined=True)
    if me.checking:
        return Wait(f"this node's health check is running; it joins round {r.number} once the check passes")
    if me.unhealthy and me.now < me.health_retry_at:
        why = f"this node is unhealthy ({me.unhealthy}); it does not join round {r.number} and checks again"
        if nobody:  # the wait says when the round times out, and ends then at the latest
            return Wait(why, min(me.health_retry_at, timeout_at), timeout_at)
        return Wait(why, me.health_retry_at)
    return JoinRound(r)


def _timed_out(v: View, r: RoundInfo, p: Params, ranking: Ranking | None) -> str:
    count = len(v.joins)
    before = set(v.last_plan.nodes) if v.last_plan else set()
    missing = ", ".join(f"{n} (unhealthy: {v.nodes[n].health})" if n in v.nodes and v.nodes[n].health else n
                        for n in sorted((before | set(v.nodes)) - set(v.joins))) or "no other node registered"
    if count < p.min_nodes:
        why = f"{count} of at least {p.min_nodes} node(s) joined round {r.number}"
    else:
        why = f"round {r.number} could not close with the {count} node(s) that joined"
    blocked = f": {ranking.blocked}" if ranking is not None and ranking.blocked else ""
    return (f"{TIMED_OUT}{why} within {p.join_timeout:g} s (--join-timeout){blocked}; "
            f"missing: {missing}")


def _running(v: View, r: RoundInfo, me: Local, p: Params) -> Action:
    plan = v.plan
    if plan is None:
        return Wait(f"round {r.number} is running but its plan is not visible yet")
    member = plan.member(me.node)
    exits = member_exits(v)  # an exit key of a node outside the plan is no member's: ignored
    lost = lost_members(v, me.node, me.lease)  # only a loss this view watches counts (the leader's: every member)
    if member is not None and me.outcome == Outcome.FAILED and me.workers_round == r.number:
        return _fail_or_bump(v, r, me, p, f"{describe_failure(me.failure)} in round {r.number}", True, me.failure)
    if lost:  # any registered agent may move the job on: a plan whose members all fenced must not hang
        losses = tuple(blame.loss_report(n, r.number, me.wall) for n in lost if n not in v.failures)[:MAX_LOSS_REPORTS]
        act = _fail_or_bump(v, r, me, p, f"node(s) {', '.join(lost)} left round {r.number}", True, None, losses)
        due = (me.lost_since if me.lost_since is not None else me.now) + LOSS_END_GRACE
        if isinstance(act, End) and me.now < due:  # a scheduler stopping every node: this one's signal comes too
            return Wait(f"node(s) {', '.join(lost)} left round {r.number}; the job ends {LOSS_END_GRACE:g} s after "
                        "unless this node is stopped too", due)
        return act
    passed = member is None and me.node in passed_over(v)
    if member is None and (me.unhealthy or not me.ready or passed):
        if me.checking:
            return Wait(f"this node's health check is running; round {r.number} runs without it")
        if not me.unhealthy or me.now >= me.health_retry_at:
            return CheckHealth(r, announce=passed)
        return Wait(f"this node is unhealthy ({me.unhealthy}); round {r.number} runs without it", me.health_retry_at)
    if member is None:
        full = " (the round is full)" if plan.group_world_size >= p.max_nodes else ""
        return Wait(f"round {r.number} runs without this node{full}; waiting to be taken into the next round")
    if me.workers_round != r.number:
        if me.draining:
            return Wait(f"the previous workers' GPU memory is not released yet; round {r.number}'s workers start "
                        "once it is (--gpu-drain-timeout)")
        return StartWorkers(plan, member)
    if me.outcome == Outcome.SUCCEEDED and me.node not in exits:
        return WriteExit(r, plan.group_world_size)
    if plan.complete and len(exits) >= len(plan.members) and set(plan.nodes) <= exits:
        return End(r, DONE, result(r, Outcome.SUCCEEDED, me.wall, v, f"all {len(plan.nodes)} node(s) finished"))
    joinable = newcomers(v) if v.full else []
    if joinable and plan.group_world_size < p.max_nodes and not exits:
        settle_at = (me.newcomers_since if me.newcomers_since is not None else me.now) + p.scale_settle
        if me.now >= settle_at:
            return Bump(r, f"node(s) {', '.join(joinable)} can join (scale-up)", counted=False,
                        scaled_for=max(v.nodes[n].mod_revision for n in joinable))
        return Wait(f"node(s) {', '.join(joinable)} registered; settling before scaling up", settle_at)
    return Wait(f"round {r.number} running with {plan.group_world_size} node(s)")


def _fail_or_bump(v: View, r: RoundInfo, me: Local, p: Params, reason: str, counted: bool,
                  failure: Failure | None, losses: tuple[Failure, ...] = ()) -> Action:
    exits = member_exits(v)
    if exits:
        why = f"{reason} after node(s) {', '.join(sorted(exits))} had finished; a partly finished job cannot be re-run"
        return End(r, FAILED, result(r, FAILED, me.wall, v, why, failure, losses), failure, losses=losses)
    used = v.restarts.used if v.restarts else 0
    limit = v.restarts.max if v.restarts else p.max_restarts
    if counted and used >= limit:
        why = f"{reason}; {BUDGET_SPENT} ({used} of {limit} restarts used, --max-restarts)"
        return End(r, FAILED, result(r, FAILED, me.wall, v, why, failure, losses), failure, losses=losses)
    after = stall.count(v.restarts, stall.round_step(v, me.step, failure)) if counted and v.restarts else None
    if after is not None and stall.exhausted(after):  # --max-no-progress-restarts: a storm with no progress ends
        why = stall.why(reason, after)
        return End(r, FAILED, result(r, FAILED, me.wall, v, why, failure, losses), failure, losses=losses)
    return Bump(r, reason, counted, failure, losses=losses, restarts=after)


def end_failed(v: View, r: RoundInfo, wall: float, reason: str, cause: Failure | None = None) -> End:
    """End the job ``failed`` at once, spending no restart, with ``cause`` as its root cause when given (its report
    is written with the end when it is of this round). Shared by every rule that ends a job before its budget."""
    res = result(r, FAILED, wall, v, reason, cause)
    if cause is not None:
        res = dataclasses.replace(res, root_cause=cause)
    return End(r, FAILED, res, cause if cause is not None and cause.round == r.number else None)


def result(r: RoundInfo, outcome: str, wall: float, v: View, reason: str, failure: Failure | None = None,
           losses: tuple[Failure, ...] = ()) -> Result:
    """The ``P/result`` value; the root cause is the round's (``blame.root_cause``: a loss report if it has one,
    else its earliest failure report)."""
    # the root cause is a member's: a failure key of a node outside the plan is no member's and is ignored
    reports = [f for n, f in v.failures.items() if v.plan is None or not v.plan.outside(n)]
    reports += ([failure] if failure else []) + list(losses)
    outcome = Outcome(str(outcome))
    root = blame.root_cause(reports) if outcome != Outcome.SUCCEEDED else None
    return Result(outcome, r.number, reason, root, v.restarts.used if v.restarts else 0, wall)


def describe_failure(failure: Failure | None) -> str:
    return failure.describe() if failure else "a worker failed"


TIMED_OUT = "rendezvous timed out: "  # how the reason of a round that never formed begins
# A loss that would end the job ends it this long after this agent first saw it: when a scheduler stops every node
# at once (scancel, a time limit), the first to leave looks lost to the others before their own signals arrive; they
# leave within it and the last to leave ends the job stopped, not failed with a healthy node blamed.
LOSS_END_GRACE = 2.0
BUDGET_SPENT = "the restart budget is spent"  # how the reason of a restart past the budget ends, with the counts
_BUDGET_SPENT_END = re.compile(rf"; {BUDGET_SPENT} \(\d+ of \d+ restarts used, --max-restarts\)$")


def job_error(result: Result) -> type[JobFailed] | type[JobStopped]:
    """The error an agent raises for a job that did not succeed: what ended it, from the reason ``decide`` gave
    (whichever agent wrote the result)."""
    if result.outcome == Outcome.STOPPED:
        return JobStopped
    if result.reason.startswith(TIMED_OUT):
        return RendezvousTimeout
    if _BUDGET_SPENT_END.search(result.reason):
        return RestartBudgetSpent
    return JobFailed
