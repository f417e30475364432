"""Quarantine arithmetic over a node's ``P/quarantine/<node>`` record: a node whose workers failed
``--quarantine-after`` times within the window sits out for the cooldown (``config.QuarantinePolicy``). Pure: no
I/O, wall time passed in. Imports ``config`` and ``schema.values``.
"""

from __future__ import annotations

import dataclasses
import time

from ..config import QuarantinePolicy
from ..schema.values import Quarantine


def record_failure(q: Quarantine | None, node: str, failed_at: float, policy: QuarantinePolicy,
                   wall: float, by: str = "") -> Quarantine:
    """``q`` (this node's record, None: none yet) with one more failure at ``failed_at``: failures older than the
    window are dropped, and the K-th within it starts a cooldown (and the count starts again); ``by`` says who
    wrote the record that starts it."""
    recent = [t for t in (q.failures if q else ()) if t > wall - policy.window] + [failed_at]
    if q is not None and q.sitting_out(wall):
        return dataclasses.replace(q, failures=tuple(recent))
    if len(recent) >= policy.after:
        why = (f"{len(recent)} worker failure(s) within {policy.window:g} s (--quarantine-after {policy.after})")
        return Quarantine(node, (), wall + policy.cooldown, why, by)
    return Quarantine(node, tuple(recent), 0.0, q.reason if q else "", q.by if q else "")


def quarantined(q: Quarantine | None, wall: float) -> str:
    """Why this node sits out now ("" when it does not)."""
    if q is None or not q.sitting_out(wall):
        return ""
    return f"quarantined until {time.strftime('%H:%M:%S', time.localtime(q.until))}: {q.reason}"


def began(before: Quarantine | None, after: Quarantine, wall: float) -> bool:
    """Whether writing ``after`` over ``before`` starts a quarantine (the scheduler hook runs for it, once)."""
    return after.sitting_out(wall) and (before is None or not before.sitting_out(wall))


def operator_record(node: str, reason: str, seconds: float, wall: float) -> Quarantine:
    """An operator's quarantine of ``node`` for ``seconds`` from ``wall`` (``etcd-agent quarantine add``)."""
    return Quarantine(node, (), wall + seconds, reason or "quarantined by an operator", "operator")
