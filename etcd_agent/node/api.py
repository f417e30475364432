"""The worker-group contract: what the agent needs of "this node's workers for one round", and what a group tells it.

A group is made per round by a ``GroupFactory`` and implemented by ``node.workers.WorkerGroup`` (processes),
``torch.group.TorchrunWorkers`` (torch's agent and its workers) and ``testing.sim.StandInGroup`` (no processes).
Guarantees every implementation keeps:

- ``start(a)`` runs round ``a.round``; ``stop`` is idempotent, may be called from any thread but the group's own,
  and returns once the workers are gone (or their stop's deadline passed); a shorter ``grace`` given while another
  stop waits brings that stop's end forward.
- The group tells the agent how the round ended here through ``post``, never on the caller's thread and never more
  than once per round each: ``GroupSucceeded`` once every local worker exited 0; ``GroupFailed`` with the report of
  the first failure of its own (the root cause: a worker that failed, or hung past ``--worker-timeout``). A failure
  caused by ``stop`` (the signal it sent) is none of its own and is not posted; a failure of its own that happened
  just before a stop still is. Later failures of its own are only logged.
- ``progress_files``: its workers' progress files (``progress.py``), where the node's training step is read
  (``steps.py``); empty when it has none.
- ``stopped_pids``: the processes the last stop ended (the GPU memory drain waits for them); empty when the group
  has none of its own to wait for.

``ExitTally`` is the bookkeeping that maps one round's worker exits onto those events, shared by the groups that
see single workers (it also counts each exit and hang in ``metrics``). Pure data and a log line: imports ``config``,
``logs``, ``metrics``, ``proctree`` and ``schema.values`` only; never ``etcd/``, ``coord/`` or the agent.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

from .. import metrics, proctree
from ..config import WorkerConfig
from ..logs import Log
from ..schema.values import Failure, Member, Plan

if TYPE_CHECKING:
    from .warm import SparePool


@dataclass(frozen=True)
class Assignment:
    """What this node's workers get for one round."""

    run_id: str
    round: int
    group_rank: int
    group_world_size: int
    rank_offset: int  # global rank of local_rank 0
    world_size: int
    master_addr: str
    master_port: int
    restart_count: int  # job-wide, the same on every node
    max_restarts: int
    job: int = 1  # which job of the run (a re-run of a finished run id is the next one): its own log tree

    @classmethod
    def of(cls, run_id: str, plan: Plan, m: Member, job: int) -> Assignment:
        """What member ``m`` of ``plan`` runs."""
        return cls(run_id=run_id, round=plan.round, group_rank=m.group_rank, group_world_size=plan.group_world_size,
                   rank_offset=m.rank_offset, world_size=plan.world_size, master_addr=plan.master_addr,
                   master_port=plan.master_port, restart_count=plan.restart_count, max_restarts=plan.max_restarts,
                   job=job)


@dataclass(frozen=True)
class WorkerExit:
    """One worker's end; ``returncode`` < 0 means killed by signal ``-returncode``."""

    local_rank: int
    rank: int
    pid: int
    returncode: int
    time: float  # wall clock when the exit was seen
    round: int

    @property
    def failed(self) -> bool:
        return self.returncode != 0

    @property
    def signal_name(self) -> str | None:
        return proctree.signal_name(-self.returncode) if self.returncode < 0 else None

    def describe(self) -> str:
        """``exit code 3`` or ``signal SIGSEGV``."""
        return proctree.describe_exit(self.returncode)


@dataclass(frozen=True)
class GroupSucceeded:
    """Every local worker of ``round`` exited 0."""

    round: int


@dataclass(frozen=True)
class GroupFailed:
    """The first failure of its own of ``round``'s group here: ``report`` is the root cause this node reports."""

    round: int
    report: Failure


GroupEvent = GroupSucceeded | GroupFailed


@runtime_checkable
class Group(Protocol):
    """This node's workers for one round (see the module doc)."""

    stopped_pids: Set[int]
    progress_files: Sequence[str]

    def describe(self, a: Assignment) -> str:
        """What ``start(a)`` runs, for the agent's log."""

    def start(self, a: Assignment) -> None:
        """Run round ``a.round`` here."""

    def stop(self, reason: str = "", grace: float | None = None, sig: int = signal.SIGTERM) -> None:
        """``sig``, grace until the stop timeout (or the shorter ``grace``), then whatever it takes."""


class GroupFactory(Protocol):
    """Makes the group of a round: ``post`` takes its events (from any thread; it must return at once)."""

    def __call__(self, cfg: WorkerConfig, post: Callable[[GroupEvent], None], *, node_id: str, logger: Log,
                 worker_timeout: float = 0.0, spares: SparePool | None = None) -> Group:
        ...


class ExitTally:
    """One round's worker exits, as the events of the contract. Not thread-safe: the group serializes calls."""

    def __init__(self, rnd: int, nproc: int, log: Log):
        self.round, self.nproc, self.log = rnd, nproc, log
        self.exited: set[int] = set()  # local ranks
        self.failed = False  # a failure of its own was posted for this round
        self.clean = True  # every exit so far was 0

    def exit(self, ex: WorkerExit, own: bool, report: Callable[[], Failure]) -> GroupEvent | None:
        """The event ``ex`` makes, if any. ``own``: it ended before any stop signalled it. ``report`` makes the
        failure report (only for the first failure of its own)."""
        self.exited.add(ex.local_rank)
        metrics.worker_exited(ex.returncode, own)
        if ex.failed:
            self.clean = False
            if not own:
                return None  # our stop ended it
            if self.failed:  # the group failed already: this one is said, once, but it is not the root cause
                self.log.warning("worker rank %d (pid %d) failed too, with %s", ex.rank, ex.pid, ex.describe(),
                                 round=ex.round)
                return None
            self.failed = True
            return GroupFailed(ex.round, report())
        if len(self.exited) == self.nproc and self.clean and not self.failed:
            return GroupSucceeded(ex.round)
        return None

    def hung(self) -> bool:
        """A worker hung: True when that is the round's first failure (then it is posted)."""
        metrics.worker_hung()
        first, self.failed = not self.failed, True
        return first
