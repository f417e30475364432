"""Every value of the key schema (``keys.py``) as a typed record: how it is written, and how it is read back.

One record per kind of key::

    R/job                      JobPointer   {gen, time}
    P/nodes/<node>             NodeInfo     who runs the agent: host, address, pid, version, nproc, lease, health,
                                            checking (no health check passed yet), topology (its path, if any)
    P/node_ranks/<rank>        RankClaim    the holder of a --node-rank
    P/quarantine/<node>        Quarantine   its recent worker failures, and until when it sits out
    P/round                    RoundInfo    {round, phase, reason, time[, nodes][, plan_parts][, last_plan]
                                            [, scaled_for]}
    P/restarts                 Restarts     {used, max[, stall_limit, best_step, stalled]}
    P/r/<n>/join/<node>        Join         address, free port, nproc, previous rank, static-rendezvous flags
    P/r/<n>/plan               Plan         the header: sizes, master, restart count, leader, parts (``plan.py``)
    P/r/<n>/plan/<b>           PlanPart     part b of the members, each with its ranks and ring predecessor
    P/r/<n>/exit/<node>        Exit         {node, outcome, time}
    P/r/<n>/failures/<node>    Failure      one worker's (or worker group's) failure report
    P/result                   Result       {outcome, round, reason, root_cause, restarts, time}
    P/progress/<node>          Progress     {node, round, step, rate, time}: its latest training step (leased)

    P/spec                     SpecValue    config.JobSpec: --nnodes, --nproc-per-node, --max-restarts; --join-timeout,
                                            --straggler-threshold (recorded, not checked)

(``P/store/...`` holds torch's own bytes, no record.) How a record is written (compact JSON with the schema
version) and read back (validated field by field against its annotations; BadKeyData names the key and the field,
so a bad value is never half-read; unknown fields are ignored, fields without a default required, ``kv`` fields
taken from the KV) is the generic codec, ``codec.py``. ``Phase`` (a round's) and ``Outcome`` (a node's workers,
the job's) are string enums, so a record compares equal to, and serialises as, the words an operator sees in
etcdctl. Pure: imports ``errors``, ``proctree`` (the wording of an exit), ``schema.codec``, ``schema.plan`` and
``schema.topology``; never ``etcd/`` or anything above.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..errors import BadKeyData
from ..proctree import describe_exit
from . import topology
from .codec import Record, Word, kv_field, omitted_when_none, required, stored_as
from .plan import Member, Plan, PlanPart  # noqa: F401 (the plan's records live in plan.py; read here with the rest)


class Phase(Word):
    """A round's phase (``P/round``): joining, then running, then the next round or a final phase."""

    JOINING = "joining"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def final(self) -> bool:
        return self in (Phase.DONE, Phase.FAILED, Phase.STOPPED)


class Outcome(Word):
    """How a node's workers (``Exit``) or the whole job (``Result``) ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True)
class JobPointer(Record):
    gen: int
    time: float = 0.0

    def check(self, key: str) -> None:
        if self.gen < 1:
            raise BadKeyData(key, f"gen must be a positive integer, not {self.gen!r}")


@dataclasses.dataclass(frozen=True)
class SpecValue(Record):
    """``P/spec``: what every agent of the job must agree on (``config.JobSpec``), and its starter's --join-timeout."""

    OMIT_NONE: ClassVar[bool] = True
    min_nodes: int
    max_nodes: int
    nproc_per_node: str  # as given: a number, gpu, cpu, auto (or torchrun: torch's agent assigns worker ranks)
    max_restarts: int
    join_timeout: float | None = None  # seconds; None: not recorded (a spec an older agent wrote)
    straggler_threshold: float | None = None  # --straggler-threshold of the job's first agent (None: off)

    @classmethod
    def of(cls, spec, join_timeout: float | None = None) -> SpecValue:
        return cls(spec.min_nodes, spec.max_nodes, spec.nproc_per_node, spec.max_restarts, join_timeout,
                   spec.straggler_threshold or None)


@dataclasses.dataclass(frozen=True)
class NodeInfo(Record):
    """A registry entry: the live agent of one node (leased to its session)."""

    node: str = ""
    host: str = ""
    addr: str = ""
    pid: int | None = None
    version: str = ""
    nproc: int | None = None
    lease: str = ""  # the session lease, in hex as etcdctl prints it
    started: float = 0.0
    health: str = ""  # why the node failed its health check ("" healthy): it does not join until it passes
    spare: bool = False  # --spare: a hot spare, taken into a plan only in place of a lost or quarantined member
    checking: bool = False  # it has a health check to pass and none has passed yet: not counted as joinable
    mod_revision: int = kv_field()  # when the entry was last written (a scale-up records whom it was for by it)
    topology: str = ""  # --topology: its blocks, outermost first (``topology.py``); "" none (left out when stored)

    def to_json(self) -> dict:
        out = super().to_json()
        if not self.topology:  # the entry of a node without a topology is as before it existed
            del out["topology"]
        return out

    def check(self, key: str) -> None:
        try:
            topology.parse(self.topology)
        except ValueError as exc:
            raise BadKeyData(key, f"topology {self.topology!r} {exc}") from None


@dataclasses.dataclass(frozen=True)
class RankClaim(Record):
    """``P/node_ranks/<rank>``: the node started with ``--node-rank <rank>``."""

    node: str
    rank: int
    host: str = ""
    pid: int | None = None
    lease: str = ""


MAX_WALL_TIME = 253402300799.0  # 9999-12-31 23:59:59 UTC: the last second Python's time and datetime print


@dataclasses.dataclass(frozen=True)
class Quarantine(Record):
    """``P/quarantine/<node>``: when this node's workers failed lately (wall times, within the window), and until
    when it sits out (0: it does not)."""

    node: str
    failures: tuple[float, ...] = ()
    until: float = 0.0
    reason: str = ""
    by: str = ""  # who wrote it: "run <run id>" (an agent of that run), "operator" (``etcd-agent quarantine add``)

    def sitting_out(self, wall: float) -> bool:
        return self.until > wall

    def check(self, key: str) -> None:
        # wall times that status, events and the agent's log print: a time no calendar shows is bad data
        for name, t in [("until", self.until)] + [(f"failures[{i}]", t) for i, t in enumerate(self.failures)]:
            if not 0 <= t <= MAX_WALL_TIME:
                raise BadKeyData(key, f"{name} must be a wall time in seconds since 1970, from 0 to "
                                      f"{MAX_WALL_TIME:.0f} (the end of the year 9999), not {t!r}")


@dataclasses.dataclass(frozen=True)
class RoundInfo(Record):
    OMIT_NONE: ClassVar[bool] = True

    number: int = stored_as("round")
    phase: Phase = required(Phase.JOINING)
    reason: str = ""
    mod_revision: int = kv_field()
    last_plan: int | None = None  # the newest earlier round that had a plan (0: none; None: not recorded)
    time: float = 0.0
    nodes: int | None = None  # how many nodes the round runs with (running rounds)
    plan_parts: int | None = None  # how many parts its plan is stored in (running rounds; None: not recorded)
    # A scale-up's round (joining, then running): the newest registry revision of the newcomers it was made for.
    # A node outside its plan whose entry is not newer was passed over: no scale-up for it until the entry changes.
    scaled_for: int | None = None

    def check(self, key: str) -> None:
        if self.number < 1:
            raise BadKeyData(key, f"round must be a positive integer, not {self.number}")
        if self.scaled_for is not None and self.scaled_for < 1:
            raise BadKeyData(key, f"scaled_for must be a positive revision, not {self.scaled_for}")
        if self.last_plan is not None and not 0 <= self.last_plan < self.number:
            raise BadKeyData(key, f"last_plan must be a round before {self.number} (0: none), not {self.last_plan!r}")


@dataclasses.dataclass(frozen=True)
class Restarts(Record):
    """``P/restarts``: the job-wide restart budget, and the no-progress guard's count (``--max-no-progress-restarts``
    ``stall_limit``, None: off): ``best_step`` is the highest step any ended round reached (None: no worker reported
    one), ``stalled`` how many restarts in a row since then ended with no step beyond it. Both change only in the
    txn that counts a restart, guarded by this key's mod_revision."""

    OMIT_NONE: ClassVar[bool] = True  # a job without the guard stores {used, max} as before
    used: int
    max: int
    mod_revision: int = kv_field()
    stall_limit: int | None = None
    best_step: int | None = None
    stalled: int | None = None

    @classmethod
    def of(cls, spec) -> Restarts:
        """A new job's budget (``config.JobSpec``): none used, and the no-progress guard's K."""
        return cls(0, spec.max_restarts, stall_limit=spec.max_no_progress_restarts or None)

    def check(self, key: str) -> None:
        if self.used < 0 or self.max < 0:
            raise BadKeyData(key, "used and max must be whole numbers")
        if min(self.stall_limit or 0, self.stalled or 0, self.best_step or 0) < 0:
            raise BadKeyData(key, "stall_limit, best_step and stalled must be whole numbers >= 0")


@dataclasses.dataclass(frozen=True)
class Join(Record):
    """A join record; ``node_rank``, ``master_addr`` and ``master_port`` are the static-rendezvous flags (None: not
    given)."""

    node: str
    create_revision: int = kv_field()
    host: str = ""
    addr: str = required("")
    port: int = required(0)
    nproc: int = required(1)
    prev_rank: int | None = None  # its group rank in the newest earlier plan, if it was in it
    lease: int = kv_field()  # the session lease the key is bound to: a node's old session shows up as another lease
    node_rank: int | None = None  # --node-rank: this node's group rank in every plan (None: not pinned)
    master_addr: str | None = None  # --master-addr/--master-port: the plan's master when this node is rank 0
    master_port: int | None = None
    time: float = 0.0
    spare: bool = False  # --spare: planned only in place of a lost or quarantined member

    def check(self, key: str) -> None:
        if self.node_rank is not None and self.node_rank < 0:
            raise BadKeyData(key, f"node_rank must be 0 or more, got {self.node_rank}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise BadKeyData(key, f"master_port must be 1-65535, got {self.master_port}")
        if self.nproc < 1:
            raise BadKeyData(key, f"nproc must be at least 1, got {self.nproc}")


@dataclasses.dataclass(frozen=True)
class Exit(Record):
    """``P/r/<n>/exit/<node>``: this node's workers all exited 0 in round n."""

    node: str
    outcome: Outcome = Outcome.SUCCEEDED
    time: float = 0.0


@dataclasses.dataclass(frozen=True)
class Failure(Record):
    """One node's failure report for a round: a worker that exited non-zero, died of a signal or hung; ``rank`` is
    None when the report is of a worker group as a whole (torchrun's agent restarted it). ``lost``: a loss report,
    written by a peer that saw the node's lease end (``blame.py``); ``time`` is when the loss was seen."""

    rank: int | None = None
    local_rank: int | None = None
    pid: int | None = None
    exitcode: int | None = None
    signal: str | None = None
    message: str = ""
    error_file: str = ""
    stderr_tail: str = ""
    time: float = 0.0
    round: int | None = None
    node: str = ""
    hang: bool = False
    lost: bool = False
    step: int | None = omitted_when_none()  # the node's latest training step in the round when it failed

    def how_it_ended(self) -> str:
        """``signal SIGKILL``, ``exit code 3``, ``hung``, ``lost`` or ``failed``."""
        if self.lost:
            return "lost"
        if self.hang:
            return "hung"
        if self.exitcode is None and not self.signal:
            return "failed"
        return describe_exit(self.exitcode, self.signal)

    def describe(self) -> str:
        if self.lost:
            return f"node {self.node} was lost"
        if self.rank is None:  # torchrun's agent restarted its group: the worker's details are torch's
            return f"the worker group on {self.node} failed ({self.message})"
        if self.hang:
            return f"worker rank {self.rank} on {self.node} hung ({self.message})"
        return f"worker rank {self.rank} on {self.node} failed with {self.how_it_ended()}"

    @property
    def headline(self) -> str:
        """The first line of the message ('' when there is none)."""
        return (self.message or "").split("\n", 1)[0]

    def with_strings(self, change) -> Failure:
        """The report with ``change`` applied to every text field (``secure.redact``)."""
        return dataclasses.replace(self, **{f: change(getattr(self, f))
                                            for f in ("message", "error_file", "stderr_tail")})


@dataclasses.dataclass(frozen=True)
class Result(Record):
    """``P/result``: how the job ended; ``root_cause`` is the final round's cause (``blame.root_cause``: a loss
    report when the round has one, else its earliest failure report)."""

    outcome: Outcome
    round: int
    reason: str = ""
    root_cause: Failure | None = None
    restarts: int = 0
    time: float = 0.0

    def ended(self, run_id: str, already: bool = False) -> str:
        """The job's end as its agents say it, the root cause said once; ``already``: said to one after the end."""
        if self.outcome == Outcome.SUCCEEDED:
            when = "already " if already else ""
            return f"job {run_id} {when}succeeded in round {self.round} after {self.restarts} restart(s)"
        root, reason, detail = self.root_cause, self.reason, ""
        named = f"{root.describe()} in round {root.round}" if root and not root.lost else ""
        if named and named in reason and (not root.message or root.message not in named):  # said once, named there
            reason = reason.replace(named, f"{named}: {root.message or 'no error message'}", 1)
        elif root:
            detail = f"; root cause: {root.message} (round {root.round})" if root.lost else (
                f"; root cause: rank {root.rank} on {root.node} ({root.how_it_ended()}) in round {root.round}: "
                f"{root.message or 'no error message'}")
        return f"job {run_id} {self.outcome}: {reason}{detail}"


@dataclasses.dataclass(frozen=True)
class Progress(Record):
    """``P/progress/<node>`` (leased): the node's latest training step in ``round`` (the highest its workers
    reported, ``progress.beat``) and its step rate (steps per second over the last window), as of ``time``."""

    node: str
    round: int
    step: int
    rate: float = 0.0
    time: float = 0.0

    def check(self, key: str) -> None:
        if self.round < 0 or self.step < 0 or self.rate < 0:
            raise BadKeyData(key, "round, step and rate must be >= 0")


RECORDS: dict[str, type[Record]] = {  # keys.ParsedKey.kind -> the record its values are
    "spec": SpecValue, "node": NodeInfo, "quarantine": Quarantine, "node_rank": RankClaim, "round": RoundInfo,
    "restarts": Restarts, "join": Join, "plan": Plan, "plan_part": PlanPart, "exit": Exit, "failure": Failure,
    "result": Result, "progress": Progress,
}


def read_value(kind: str, kv) -> Record | None:
    """The record of a KV whose key is of ``kind`` (None for the c10d store's keys, which have none)."""
    return RECORDS[kind].from_kv(kv) if kind in RECORDS else None
