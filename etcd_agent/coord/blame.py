"""Which node a round's failure is blamed on: pure decisions, no I/O.

When a node dies, its peers' collectives fail first ("Connection closed by peer"): a survivor's worker failure
restarts the round, and the dead node's lease ends only up to a lease TTL later. Invariants:

- A plan member whose lease ended (its registry entry is gone and it joined neither the next round nor its plan)
  within ``window`` (a lease TTL plus slack) of its round's first failure report gets a loss report under that
  round's failures (``Failure.lost``), written once by whoever watches the registry (the next round's leader, or a
  node waiting to know whether its own failure counts), and never over a report the node wrote itself.
- A loss report is its round's cause (``root_cause``): worker failures of other nodes near it were caused by it.
  A worker failure more than ``window`` before the loss stays the cause (no loss report is written then).
- A node's own failure counts toward its quarantine only once it is known not to be a loss's (``verdict``): the
  round has no loss report and every other member of it was seen alive after the failure, or ``window`` passed.
Imports ``schema.values`` and ``coord.mirror`` only.
"""

from __future__ import annotations

import dataclasses

from .mirror import View
from ..schema.values import Failure

LOSS_SLACK = 1.0  # seconds beyond the TTL: expired leases are swept every 0.5 s, and a watch takes a moment


@dataclasses.dataclass(frozen=True)
class ReportLoss:
    """An action: write loss reports (create-if-absent) under an earlier round's failures (``unreported_losses``)."""

    reports: tuple[Failure, ...]


@dataclasses.dataclass(frozen=True)
class Attribute:
    """An action: this node's failure that restarted the job counts toward its quarantine (``counted``), or it was
    a loss's (``verdict``)."""

    failure: Failure
    counted: bool


def window(lease_ttl: float) -> float:
    """How long after a round's first failure a lease that ends is still that failure's cause: a node that died
    when its peers' workers failed loses its lease at most a TTL later (plus the sweep and the watch)."""
    return lease_ttl + max(LOSS_SLACK, lease_ttl / 2)


def loss_report(node: str, rnd: int, wall: float) -> Failure:
    return Failure(message=f"node {node} was lost: its lease ended (it died, froze, was cut off from etcd or left)",
                   time=wall, round=rnd, node=node, lost=True)


def root_cause(reports) -> Failure | None:
    """A round's cause: its earliest loss report, else its earliest failure report (None: no report)."""
    reports = list(reports)
    losses = [f for f in reports if f.lost]
    return min(losses or reports, key=lambda f: f.time) if reports else None


def attribution(reports) -> str:
    """The log's and ``status``'s words for a round's cause when it is a loss, e.g. ``round 1's failure is
    attributed to node-2, lost (its lease ended 2.1 s after node-0's worker rank 0 failed)``; "" otherwise."""
    reports = list(reports)
    cause = root_cause(reports)
    if cause is None or not cause.lost:
        return ""
    workers = [f for f in reports if not f.lost]
    first = min(workers, key=lambda f: f.time) if workers else None
    when = ""
    if first is not None:
        gap = cause.time - first.time
        who = f"{first.node}'s worker rank {first.rank}" if first.rank is not None else f"{first.node}'s workers"
        when = f" (its lease ended {abs(gap):.1f} s {'after' if gap >= 0 else 'before'} {who} failed)"
    return f"round {cause.round}'s failure is attributed to {cause.node}, lost{when}"


def unreported_losses(v: View, wall: float, lease_ttl: float) -> list[str]:
    """Members of the newest earlier plan lost within ``window`` of that round's first failure report, with no
    report of their own there yet. Needs a full view (the registry, this round's joins, that round's failures)."""
    last, reports = v.last_plan, v.last_failures
    if not v.full or last is None or not reports or v.round is None or v.round.number <= last.round:
        return []
    if wall - min(f.time for f in reports.values()) > window(lease_ttl):
        return []
    return [n for n in last.nodes if n not in reports and gone(v, n)]


def gone(v: View, node: str) -> bool:
    """Whether ``node`` has no live registration and has neither joined the current round nor is in its plan."""
    in_plan = v.plan is not None and not v.plan.outside(node)
    return node not in v.nodes and node not in v.joins and not in_plan


def verdict(v: View, failure: Failure, wall: float, lease_ttl: float) -> bool | None:
    """Whether this node's ``failure`` (it restarted the job) counts toward its quarantine: False when its round's
    cause is a loss, True once it cannot be one (every other member of its round was seen alive in a later round,
    or ``window`` passed), None while that is not known yet."""
    last = v.last_plan
    if last is not None and last.round == failure.round and v.last_failures is not None:
        cause = root_cause(v.last_failures.values())
        if cause is not None and cause.lost:
            return False
        others = [n for n in last.nodes if n != failure.node]
        if v.full and all(n in v.joins or (v.plan is not None and v.plan.member(n)) for n in others):
            return True
    if wall >= failure.time + window(lease_ttl):
        return True
    return None
