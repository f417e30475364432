"""What this agent notes from each view before it decides: ``observe(view, local, ...) -> (Local, Notes)``.

The timers ``decide`` reads are first sightings, kept in ``Local`` (monotonic seconds): when this agent first saw the
current round (its join timeout runs from then), when it first saw ``min_nodes`` joiners in it (the last call runs
from then; it starts again when the count drops below MIN), when it first saw a newcomer outside the running plan
(a scale-up settles from then), and when it first saw a member of the running round lost (a loss that ends the job
ends it ``decide.LOSS_END_GRACE`` after). A quarantine record that an operator lifted makes an unhealthy node check
itself again now. ``Notes`` are what the agent logs: the round it is in from now on, and (for a full view) the nodes a
scale-up passed over. What the agent says while it waits is ``waiting.wait_note``'s.

Pure: no I/O, time passed in. Imports ``coord/`` (``decide``, ``mirror``) only; never ``etcd/`` or ``node/``.
"""

from __future__ import annotations

import dataclasses

from .decide import Local, Params, lost_members, newcomers, passed_over
from .mirror import RUNNING, View


@dataclasses.dataclass(frozen=True)
class Notes:
    """What a view told this agent that it says in its log."""

    new_round: int | None = None  # the round it sees first now: its log lines say that round from now on
    passed_over: tuple[tuple[str, int], ...] = ()  # (node, registry revision) a scale-up did not admit


def observe(v: View, me: Local, p: Params, now: float, wall: float, lifted: bool = False) -> tuple[Local, Notes]:
    """``me`` brought up to date with ``v`` at ``now`` (monotonic) and ``wall``; ``lifted``: this node's quarantine
    record was lifted since it held the node out. (What the node's own objects know, its workers and checks, the
    agent copies into ``Local`` itself.)"""
    changes: dict = {"now": now, "wall": wall}
    rnd, new_round = v.round, None
    if me.unhealthy and lifted:
        changes["health_retry_at"] = now  # its quarantine key was deleted (or rewritten): check again now
    if rnd and rnd.number != me.round:
        new_round = rnd.number
        changes.update(round=rnd.number, round_seen_at=now, min_reached_at=None)
    if rnd and len(v.joins) < p.min_nodes:
        changes["min_reached_at"] = None  # the last call starts again when MIN is reached again
    elif rnd and me.min_reached_at is None:
        changes["min_reached_at"] = now
    passed = tuple((n, v.nodes[n].mod_revision) for n in sorted(passed_over(v))) if v.full else ()
    if not newcomers(v):
        changes["newcomers_since"] = None
    elif me.newcomers_since is None:
        changes["newcomers_since"] = now
    running = rnd is not None and rnd.phase == RUNNING
    if not running or not lost_members(v, me.node, me.lease):
        changes["lost_since"] = None
    elif me.lost_since is None:
        changes["lost_since"] = now
    return dataclasses.replace(me, **changes), Notes(new_round, passed)

