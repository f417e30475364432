"""The node's side of the gate before a join, and its slow checks, run off the agent's loop: the health check
(``--health-check``, NVML) and the GPU memory drain before new workers start (``--gpu-drain-timeout``).

Each check runs on a thread of its own and posts its verdict to the agent's queue (``HealthChecked``, ``Drained``);
while one runs, ``decide`` waits (``Local.checking``, ``Local.draining``) on that same queue, so a signal,
``etcd-agent stop``, a watch event or a peer's loss is handled at once, never after the check. A check that raises
is a verdict too (unhealthy, or a warning for the drain): it never ends the agent.

``gate`` is this node's verdict before a join: a reason to sit out that the agent read from etcd (a quarantine), else
the health check's; failures in a row back off (``health.backoff``), and a change of verdict is logged once. The etcd
side (the quarantine record, the registry entry that says why) is the coordinator's; the agent combines the two.

Imports ``node.api``, ``node.gpu``, ``node.health``, ``config``, ``schema.values`` and ``logs`` only; never
``etcd/``, ``coord/`` or the agent.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Callable

from .. import logs, proctree
from . import gpu, health
from .api import Group
from ..config import AgentConfig
from ..schema.values import Failure

FRESH = 5.0  # seconds a health verdict may wait for the join it was made for (a pass: plus --scale-settle)


@dataclasses.dataclass(frozen=True)
class HealthChecked:
    """A health check ended: the problem it found ("": healthy)."""

    problem: str


@dataclasses.dataclass(frozen=True)
class Drained:
    """The GPU memory drain of ``group``'s stopped workers, started at ``started`` (monotonic), ended: ``held`` are
    the pids still holding memory (pid -> bytes; empty: released); ``error``: NVML could not be read."""

    group: Group
    started: float
    held: dict[int, int]
    error: Exception | None = None


CheckEvent = HealthChecked | Drained


@dataclasses.dataclass(frozen=True)
class Gate:
    """This node's verdict before a join: ``problem`` ("": it may join) and when it checks again (monotonic)."""

    problem: str
    retry_at: float = 0.0


class Checks:
    def __init__(self, cfg: AgentConfig, post: Callable[[CheckEvent], None], log: logs.Log):
        self.cfg = cfg
        self._post = post
        self.log = log
        self.checking = False  # a health check runs now
        self._proc = None  # the --health-check command's process while it runs
        self._verdict: tuple[str, float] | None = None  # the last health check's problem ("": healthy) and when
        self.failures = 0  # gate verdicts with a problem, in a row
        self._said = ""  # the problem the gate last gave ("": none)
        self.draining = False  # a GPU memory drain runs now
        self._drained: Group | None = None  # the group whose stopped workers were seen to release their GPU memory
        self.held: Failure | None = None  # the drain timed out: the next start fails with this report

    def _run(self, name: str, body: Callable[[], CheckEvent]) -> None:
        threading.Thread(target=lambda: self._post(body()), name=f"{name}-check", daemon=True).start()

    # --- the gate, before a join ----------------------------------------------------------------------------
    def gate(self, held: str = "", wait: float = 0.0) -> Gate | None:
        """This node's verdict: ``held`` (why etcd's records hold it out, "" when they do not; ``wait``: for how
        long), else the health check's when one is configured; None while that check runs (its verdict wakes the
        loop). A problem backs off (``wait``, else ``health.backoff`` of the failures in a row)."""
        problem = held
        if not problem and self.cfg.health.active:
            verdict = self.health()
            if verdict is None:
                return None
            problem = verdict
        if problem:
            self.failures += 1
            wait = wait or health.backoff(self.failures)
            if problem != self._said:
                self.log.warning("this node is unhealthy and does not join: %s (next check in %.0f s)", problem,
                                 wait)
            self._said = problem
            return Gate(problem, time.monotonic() + wait)
        if self._said:
            self.log.info("this node passed its health check after %d failed one(s); joining", self.failures)
        self.failures, self._said = 0, ""
        return Gate("")

    # --- health, before a join -----------------------------------------------------------------------------
    def health(self) -> str | None:
        """The problem a health check just found ("": healthy); None when there is no fresh verdict yet, in which
        case a check is started (if none runs) and its verdict arrives through the queue. A problem is told once;
        a pass holds for FRESH + --scale-settle seconds, long enough for the scale-up that a pass made outside the
        running round brings about (the join then needs no second check, which would miss that round)."""
        verdict = self._verdict
        if verdict is not None:
            problem, at = verdict
            if not problem and time.monotonic() - at <= FRESH + self.cfg.scale_settle:
                return ""
            self._verdict = None
            if problem and time.monotonic() - at <= FRESH:
                return problem
        if not self.checking:
            self.checking = True
            self._run("health", self._check)
        return None

    def _check(self) -> HealthChecked:
        try:
            return HealthChecked(health.check(self.cfg.health, started=self._started))
        except Exception as exc:  # noqa: BLE001 - a broken check is a verdict, never the agent's end
            return HealthChecked(f"the health check could not run: {type(exc).__name__}: {exc}")

    def _started(self, proc) -> None:
        self._proc = proc

    def close(self) -> None:
        """The agent exits: a health check still running is killed with what it started (its process group)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proctree.kill_group(proc.pid, signal.SIGKILL)

    def health_done(self, event: HealthChecked) -> None:
        """The queue delivered a health verdict."""
        self.checking = False
        self._verdict = (event.problem, time.monotonic())

    # --- GPU memory, before a start ------------------------------------------------------------------------
    def must_drain(self, group: Group | None) -> bool:
        """GPU jobs: whether the stopped workers of ``group`` may still hold GPU memory (not seen released yet);
        starts the drain when it is not running. While it runs, nothing starts."""
        pids = group.stopped_pids if group is not None else None
        if not pids or self.cfg.health.gpus is None or self._drained is group:
            return False
        if not self.draining:
            self.draining = True
            started = time.monotonic()

            def drain() -> Drained:
                try:
                    return Drained(group, started, gpu.wait_drained(set(pids), self.cfg.gpu_drain_timeout))
                except Exception as exc:  # noqa: BLE001 - NVML trouble must not keep the job from going on
                    return Drained(group, started, {}, exc)
            self._run("drained", drain)
        return True

    def drain_done(self, event: Drained, round_number: int) -> None:
        """The queue delivered the drain's verdict: released (the group is done with), or still held after
        --gpu-drain-timeout (``held`` is the failure the next start reports; the drain runs again before the start
        after that)."""
        self.draining = False
        if event.error is not None:
            self.log.warning("could not read the GPU memory of the previous workers (%s: %s); starting new workers "
                             "anyway", type(event.error).__name__, event.error)
            self._drained = event.group
            return
        if not event.held:
            waited = time.monotonic() - event.started
            if waited >= 0.5:
                self.log.info("the last workers' GPU memory was released after %.1f s", waited)
            self._drained = event.group
            return
        who = ", ".join(f"pid {pid} ({size / 2**20:.0f} MiB)" for pid, size in sorted(event.held.items()))
        message = (f"GPU memory of the previous workers is still held {self.cfg.gpu_drain_timeout:g} s after they "
                   f"were stopped (--gpu-drain-timeout): {who}; new workers would run out of memory")
        self.log.error("%s", message)
        self.held = Failure(message=message, time=time.time(), round=round_number, node=self.cfg.node_id)
