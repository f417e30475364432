"""The no-progress guard (``--max-no-progress-restarts K``): a restart storm that makes no training progress ends
the job ``failed`` before the restart budget is spent. Pure functions; ``decide`` applies them.

The guard's state is part of the job-wide restart budget, ``P/restarts`` (``values.Restarts``): ``stall_limit`` (K,
recorded by the job's first agent; absent: off), ``best_step`` (the highest step any ended round reached) and
``stalled`` (how many restarts in a row since then ended with no step beyond it). Each counted failure computes the
record after it (``count``) and writes it in the txn that moves the round on, guarded by the record's
mod_revision, so two agents can never both count one restart, nor count it on stale figures. When the count
reaches K, the action is no restart but the job's end, with a reason that names K and the step (``why``).

The step a round reached is the highest step known to the deciding agent: its own node's (``progress.beat``), its
failure report's, and the other failure reports of the round it sees (data-parallel ranks move in lockstep). The
guard is off while no worker of the job reported a step; once one has, a round that reports none made no progress.

Imports ``schema.values`` and ``coord.mirror`` only.
"""

from __future__ import annotations

import dataclasses

from .mirror import View
from ..schema.values import Failure, Restarts


def round_step(v: View, own: int | None, failure: Failure | None) -> int | None:
    """The highest step the view's round reached, as far as this agent knows (None: none reported)."""
    known = (own, failure.step if failure else None, *(f.step for f in v.failures.values()))
    return max((s for s in known if s is not None), default=None)


def count(rs: Restarts, step: int | None) -> Restarts:
    """The restart budget after one more counted restart whose round reached ``step``."""
    if not rs.stall_limit or (step is None and rs.best_step is None):  # off, or no worker reported a step yet
        return dataclasses.replace(rs, used=rs.used + 1)
    if step is not None and (rs.best_step is None or step > rs.best_step):
        return dataclasses.replace(rs, used=rs.used + 1, best_step=step, stalled=0)
    return dataclasses.replace(rs, used=rs.used + 1, stalled=(rs.stalled or 0) + 1)


def exhausted(rs: Restarts) -> bool:
    """Whether the guard ends the job: K restarts in a row made no progress (``rs`` as ``count`` made it)."""
    return bool(rs.stall_limit) and (rs.stalled or 0) >= rs.stall_limit


def why(reason: str, rs: Restarts) -> str:
    """The job's end reason: the failure that ended it, then the storm the guard stopped."""
    return (f"{reason}; {rs.stalled} restarts in a row made no progress beyond step {rs.best_step} "
            f"(--max-no-progress-restarts {rs.stall_limit}; {rs.used - 1} of {rs.max} restarts used)")
