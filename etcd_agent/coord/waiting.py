"""What an agent says while it waits: ``wait_note(action, view, local, params, forming, said, now) -> Note``.

In rendezvous what the agent waits for is one line at INFO when something changed and, while a round forms, again
every ``WAIT_NOTE_PERIOD`` seconds; otherwise (its workers run) the wait is said at DEBUG only. A line says what changed
since the last one (who joined, left, registered or deregistered), who joined, how many more the round needs
(``--nnodes`` MIN) or may take (MAX), which registered nodes have not joined and why, and the time left until the
round times out (``--join-timeout``) or its last call closes it (``--last-call``); when nothing changed, one short
"still waiting" line. ``Note.next_at`` is when the next line is due: the agent's wait wakes for it, so a round
waiting for its join timeout is never silent for longer than the period.

Who joined is known only to a full view (the round's leader, and a node that does not join and watches the round);
a joiner that does not lead sees its leader only, and says so, with the time left as the round's opening (its wall
time in the round key) and this node's --join-timeout and clock put it: about, as the leader times the round.

Pure: no I/O, time passed in. Imports ``coord/`` (``decide``, ``mirror``) only; never ``etcd/`` or ``node/``.
"""

from __future__ import annotations

import dataclasses

from .decide import Local, Params, Wait
from .mirror import JOINING, View

WAIT_NOTE_PERIOD = 30.0  # seconds between lines while a round forms (read at each call: a test may shorten it)
NAMED = 8  # the nodes a line names in one list; the count of the others is given


@dataclasses.dataclass(frozen=True)
class Said:
    """The last line at INFO: the reason, when (monotonic), and the facts the next line is compared with."""

    why: str = ""
    at: float = 0.0
    round: int = 0
    joined: frozenset[str] | None = None  # the round's joiners as a full view saw them (None: not seen)
    idle: frozenset[str] = frozenset()  # the registered nodes that had not joined (a full view's)


@dataclasses.dataclass(frozen=True)
class Note:
    line: str  # what the agent logs at INFO ("": nothing, the wait is said at DEBUG)
    said: Said  # the last line said, from now on
    next_at: float | None  # when the next line is due (None: not while no round forms)


def wait_note(action: Wait, v: View, me: Local, p: Params, forming: bool, said: Said, now: float) -> Note:
    """Whether (and what) the agent says at INFO about ``action`` while it is in rendezvous (``forming``): when the
    reason or the round's joiners changed since ``said``, and, while the round is joining, once ``WAIT_NOTE_PERIOD``
    seconds have passed since it (the short "still waiting" line when nothing changed, registrations included)."""
    if not forming:
        return Note("", said, None)
    period = WAIT_NOTE_PERIOD
    rnd = v.round.number if v.round is not None else 0
    joining = v.round is not None and v.round.phase == JOINING  # else (a running round, none yet): on a change only
    joined = frozenset(v.joins) if v.full and joining else None
    idle = frozenset(set(v.nodes) - joined) if joined is not None else frozenset()
    # a registration alone is no news worth a line of its own (each node would make two): the next line says it
    news = (said.why, said.round, said.joined) != (action.why, rnd, joined)
    if not news and (not joining or now - said.at < period):
        return Note("", said, said.at + period if joining else None)
    same = not news and said.idle == idle
    line = still(action, v, me, p, now) if same else first(action, v, me, p, said, now)
    return Note(line, Said(action.why, now, rnd, joined, idle), now + period if joining else None)


def first(action: Wait, v: View, me: Local, p: Params, said: Said, now: float) -> str:
    """The line when something changed: the reason, then (a full view of a forming round) what changed, who joined
    and who is missing, then the time left."""
    parts = [f"waiting: {action.why}"]
    if v.full and v.round is not None and v.round.phase == JOINING:
        parts += [part for part in (changes(v, said), who_joined(v, p), who_missing(v, p)) if part]
    left = time_left(action, v, me, p, now)
    if left:
        parts.append(left[0])
    return "; ".join(parts)


def still(action: Wait, v: View, me: Local, p: Params, now: float) -> str:
    """The line when nothing changed: how many the round still waits for (its leader, or a joiner with a full
    view), else the reason; and the time left."""
    left = time_left(action, v, me, p, now)
    short = f", {left[1]}" if left else ""
    count = len(v.joins)
    if v.full and v.round is not None and v.round.phase == JOINING and me.node in v.joins:
        rnd = v.round.number
        if count < p.min_nodes:
            return f"still waiting for {p.min_nodes - count} of {p.min_nodes} node(s) in round {rnd}{short}"
        return (f"still waiting in round {rnd} with {count} node(s), room for {max(0, p.max_nodes - count)} more "
                f"(--nnodes {nnodes(p)}){short}")
    return f"still waiting: {action.why}{short}"


def changes(v: View, said: Said) -> str:
    """What changed in the round since the last line (nothing when that line was of another round)."""
    if said.joined is None or said.round != v.round.number:
        return ""
    now_joined, now_idle = set(v.joins), set(v.nodes) - set(v.joins)
    registered = set(v.nodes) - said.joined - said.idle
    gone = (said.joined | said.idle) - set(v.nodes) - now_joined
    said_of = [(now_joined - said.joined, "joined"), (said.joined - now_joined - gone, "left the round"),
               (registered & now_idle, "registered"), (gone, "deregistered")]
    found = [f"{names(nodes)} {what}" for nodes, what in said_of if nodes]
    return ", ".join(found) + " since the last line" if found else ""


def who_joined(v: View, p: Params) -> str:
    count = len(v.joins)
    who = names(v.joins) if count else "none"
    return f"joined: {who} ({count} of --nnodes {nnodes(p)})"


def who_missing(v: View, p: Params) -> str:
    """How many more the round needs (MIN) or may take (MAX), and the registered nodes that have not joined."""
    count = len(v.joins)
    if count < p.min_nodes:
        more = f"{p.min_nodes - count} more needed"
    elif count < p.max_nodes:
        more = f"room for {p.max_nodes - count} more"
    else:
        more = "full"
    idle = sorted(set(v.nodes) - set(v.joins))
    if not idle:
        return f"{more}; no other node registered"
    said = [f"{n}{why_idle(v, n)}" for n in idle[:NAMED]]
    others = f" and {len(idle) - NAMED} more" if len(idle) > NAMED else ""
    return f"{more}; registered but not joined: {', '.join(said)}{others}"


def why_idle(v: View, node: str) -> str:
    info = v.nodes[node]
    if info.health:
        return f" (unhealthy: {info.health.splitlines()[0]})"
    if info.checking:
        return " (checking its health)"
    return " (spare)" if info.spare else ""


def time_left(action: Wait, v: View, me: Local, p: Params, now: float) -> tuple[str, str] | None:
    """The time left until the round times out or its last call closes it, long and short; None when the wait is
    not timed (or this view cannot know)."""
    r = v.round
    if action.timeout_at is not None:
        s = f"{max(0.0, action.timeout_at - now):.0f} s"
        return f"the round times out in {s} (--join-timeout)", f"{s} left (--join-timeout)"
    if r is None or r.phase != JOINING or me.node not in v.joins:
        return None
    if v.full and action.deadline is not None and len(v.joins) >= p.min_nodes:  # the leader's last call
        s = f"{max(0.0, action.deadline - now):.0f} s"
        return f"the last call closes it in {s} (--last-call)", f"the last call closes it in {s}"
    if not v.full:  # a joiner that does not lead: its leader times the round, from about when the round opened
        opened = r.time - (me.wall - me.now) if r.time else me.round_seen_at  # its wall time on this monotonic clock
        s = f"{max(0.0, opened + p.join_timeout - now):.0f} s"
        return f"the round times out in about {s} (--join-timeout)", f"about {s} left (--join-timeout)"
    return None


def nnodes(p: Params) -> str:
    return str(p.min_nodes) if p.min_nodes == p.max_nodes else f"{p.min_nodes}:{p.max_nodes}"


def names(nodes) -> str:
    """The first ``NAMED`` of ``nodes`` in order, and how many more there are."""
    ordered = sorted(nodes)
    more = f" and {len(ordered) - NAMED} more" if len(ordered) > NAMED else ""
    return ", ".join(ordered[:NAMED]) + more
