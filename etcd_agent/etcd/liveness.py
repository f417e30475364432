"""Whether watch streams still live, checked by ONE thread for every stream of the process.

A watch stream that says nothing may be idle (nothing changed) or dead: a frozen or partitioned member keeps the TCP
socket open and never answers (ETCD_CLIENT.md fault 6), and etcd sends its own progress notifications only every
10 minutes by default. A progress request on the stream tells the two apart (etcd answers it at once), but one
every second on every stream was most of an idle agent's etcd requests (issue 26). So a stream is asked only when
there is a reason to doubt it, and the reasons come cheaply from what the client hears anyway:

- ``Etcd.heard(member)`` notes every answer the client gets from a member: each keepalive answer (every TTL/3 on
  the same channel, ``session.py``), each unary call that succeeded, each watch response. ``Etcd.mark_failed``
  forgets the member: nothing heard from it counts any more.
- A stream is probed (one progress request) when it has been silent for ``quiet`` s and nothing was heard from its
  member for ``quiet`` s either, or when it has been silent for ``idle`` s whatever its member said (a stream can
  hang alone on a live member and channel; this is what still catches it).
- A probe is answered by anything at all on the stream. One unanswered for ``answer`` s declares the stream dead:
  ``dead()`` runs (the watch cancels the stream, marks its member failed and resumes from its next revision).

The times come from one probe interval ``q`` (``Timings.watch_probe``, max(0.5, TTL/5) for the agent): ``quiet`` =
2q, ``answer`` = 2q, ``idle`` = 10q. Because the keepalive period (TTL/3, or less with several members) is under
2q, a live member is always heard within ``quiet``: an idle agent's stream is probed every ``idle`` s only (every
10 s at TTL 5: 0.1 requests per second, where it was 1). A member that froze right after it last answered is heard
no more: its streams are probed ``quiet`` s after that answer and declared dead ``answer`` s later, so within 4q of
that answer (at TTL 5 the answer came at most TTL/3 before the freeze: dead 2.3-4 s after it; the rule this
replaces, three silent probe intervals checked every interval, took 3-4 s).
A stream that hangs alone is found within ``idle`` + ``answer`` = 12q. A busy etcd that answers late is given 2q
after a probe, as before (three silent intervals).

One daemon thread serves every stream: it sleeps until the earliest moment a stream may need a probe or may be
dead, never polling, and probes and cancels outside its lock. Imports ``logs``; nothing else of the package.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from .. import logs

log = logs.get("etcd_agent.etcd.liveness")
QUIET, ANSWER, IDLE = 2.0, 2.0, 10.0  # multiples of the probe interval (see the module doc)


class Pulse:
    """What the prober knows of one stream: when it last said anything, and when it was last probed."""

    def __init__(self, interval: float, member_heard: Callable[[], float], probe: Callable[[], None],
                 dead: Callable[[], None], eager: bool = False):
        """``member_heard()``: when the stream's member last answered anything (0: never, or failed since);
        ``probe()`` sends a progress request on the stream; ``dead()`` ends it. An ``eager`` stream wants the
        progress answers themselves (the exporter's "up", the replay's end): it is probed whenever it was silent
        for one interval, whatever its member said, and is dead after 3 silent intervals, as before."""
        self.quiet, self.answer, self.idle = (interval if eager else QUIET * interval), ANSWER * interval, \
            (interval if eager else IDLE * interval)
        self._member_heard = (lambda: 0.0) if eager else member_heard
        self._probe, self._dead = probe, dead
        self.seen = time.monotonic()  # the stream's last response (its start, until then): its reader sets it
        self.probed = 0.0  # when the last probe went (0: none yet)
        self.verdict = ""  # "dead" once declared dead

    def due(self, now: float) -> tuple[str, float]:
        """("probe" | "dead" | "", the next moment this stream needs a look)."""
        seen = self.seen
        if self.probed > seen:  # a probe is out, unanswered so far
            at = self.probed + self.answer
            return ("dead" if now >= at else ""), at
        heard = max(seen, self._member_heard())
        at = min(seen + self.idle, heard + self.quiet)
        return ("probe" if now >= at else ""), at


class Prober:
    """The one thread that looks after every registered ``Pulse`` (see the module doc)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._pulses: set[Pulse] = set()
        self._changes = 0  # pulses added and members forgotten: one while the thread acted is looked at at once
        self._thread: threading.Thread | None = None
        self._pid = 0  # the process the thread runs in: a forked child starts its own

    def add(self, pulse: Pulse) -> None:
        with self._cond:
            self._pulses.add(pulse)
            self._changes += 1
            if self._thread is None or self._pid != os.getpid():
                self._thread = threading.Thread(target=self._run, name="watch-prober", daemon=True)
                self._pid = os.getpid()
                self._thread.start()
            self._cond.notify()

    def remove(self, pulse: Pulse) -> None:
        with self._cond:
            self._pulses.discard(pulse)

    def wake(self) -> None:
        """Something heard was forgotten (``Etcd.mark_failed``): look again now, a stream may need a probe sooner."""
        with self._cond:
            self._changes += 1
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                now, changes = time.monotonic(), self._changes
                todo, wake = self._look(now)
            for pulse, what in todo:
                self._act(pulse, what)
            with self._cond:
                if self._changes == changes:
                    self._cond.wait(None if wake is None else max(0.0, wake - time.monotonic()))

    def _look(self, now: float) -> tuple[list[tuple[Pulse, str]], float | None]:
        """What is due now (a dead stream is dropped, a probed one marked), and when the next look is needed."""
        todo, wake = [], None
        for pulse in list(self._pulses):
            what, at = pulse.due(now)
            if what == "dead":
                self._pulses.discard(pulse)
                pulse.verdict = "dead"
            elif what == "probe":
                pulse.probed = now
                at = now + pulse.answer
            if what:
                todo.append((pulse, what))
            if what != "dead":
                wake = at if wake is None else min(wake, at)
        return todo, wake

    @staticmethod
    def _act(pulse: Pulse, what: str) -> None:
        try:
            if what == "dead":
                pulse._dead()
            else:
                pulse._probe()
        except Exception:  # noqa: BLE001 - one stream's failure must never stop the thread that serves them all
            log.exception("watch liveness: the %s of a stream failed", what)


PROBER = Prober()
