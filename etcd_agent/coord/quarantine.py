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
                   wall: float) -> Quarantine:
    """``q`` (this node's record, None: none yet) with one more failure at ``failed_at``: failures older than the
    window are dropped, and the K-th within it starts a cooldown (and the count starts again)."""
    recent = [t for t in (q.failures if q else ()) if t > wall - policy.window] + [failed_at]
    if q is not None and q.sitting_out(wall):
        return dataclasses.replace(q, failures=tuple(recent))
    if len(recent) >= policy.after:
        why = (f"{len(recent)} worker failure(s) within {policy.window:g} s (--quarantine-after {policy.after})")
        return Quarantine(node, (), wall + policy.cooldown, why)
    return Quarantine(node, tuple(recent), 0.0, q.reason if q else "")


def quarantined(q: Quarantine | None, wall: float) -> str:
    """Why this node sits out now ("" when it does not)."""
    if q is None or not q.sitting_out(wall):
        return ""
    return f"quarantined until {time.strftime('%H:%M:%S', time.localtime(q.until))}: {q.reason}"
