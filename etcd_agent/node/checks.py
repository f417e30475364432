"""The node's slow checks, run off the agent's loop: the health check before a join (``--health-check``, NVML)
and the GPU memory drain before new workers start (``--gpu-drain-timeout``).

Each check runs on a thread of its own and posts its verdict to the agent's queue, as ``("health", problem)`` or
``("drained", (group, held))``; while one runs, ``rendezvous.decide`` waits (``Local.checking``,
``Local.draining``) on that same queue, so a signal, ``etcd-agent stop``, a watch event or a peer's loss is handled
at once, never after the check. A check that raises is a verdict too (unhealthy, or a warning for the drain): it
never ends the agent. Imports ``node.gpu``, ``node.health``, ``config``, ``schema.values`` and ``logs`` only.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

from .. import logs
from . import gpu, health
from ..config import AgentConfig
from ..schema.values import Failure

FRESH = 5.0  # seconds a health verdict may wait for the join it was made for (a pass: plus --scale-settle)


class Checks:
    def __init__(self, cfg: AgentConfig, post: Callable[[tuple], None], log: logs.Log):
        self.cfg = cfg
        self._post = post
        self.log = log
        self.checking = False  # a health check runs now
        self._proc = None  # the --health-check command's process while it runs
        self._verdict: tuple[str, float] | None = None  # the last health check's problem ("": healthy) and when
        self.draining = False  # a GPU memory drain runs now
        self._drained: object = None  # the group whose stopped workers were seen to release their GPU memory
        self.held: Failure | None = None  # the drain timed out: the next start fails with this report

    def _run(self, kind: str, fn: Callable[[], object]) -> None:
        def body() -> None:
            try:
                verdict = fn()
            except Exception as exc:  # noqa: BLE001 - a broken check is a verdict, never the agent's end
                verdict = exc
            self._post((kind, verdict))
        threading.Thread(target=body, name=f"{kind}-check", daemon=True).start()

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
            self._run("health", lambda: health.check(self.cfg.health, started=self._started))
        return None

    def _started(self, proc) -> None:
        self._proc = proc

    def close(self) -> None:
        """The agent exits: a health check still running is killed with what it started (its process group)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def health_done(self, verdict) -> None:
        """The queue delivered a health verdict (a problem, "" or the exception the check raised)."""
        self.checking = False
        if isinstance(verdict, Exception):
            verdict = f"the health check could not run: {type(verdict).__name__}: {verdict}"
        self._verdict = (verdict, time.monotonic())

    # --- GPU memory, before a start ------------------------------------------------------------------------
    def must_drain(self, group) -> bool:
        """GPU jobs: whether the stopped workers of ``group`` may still hold GPU memory (not seen released yet);
        starts the drain when it is not running. While it runs, nothing starts."""
        pids = getattr(group, "stopped_pids", None) if group is not None else None
        if not pids or self.cfg.health.gpus is None or self._drained is group:
            return False
        if not self.draining:
            self.draining = True
            started = time.monotonic()

            def drain():
                try:
                    return group, started, gpu.wait_drained(pids, self.cfg.gpu_drain_timeout)
                except Exception as exc:  # noqa: BLE001 - NVML trouble must not keep the job from going on
                    return group, started, exc
            self._run("drained", drain)
        return True

    def drain_done(self, verdict, round_number: int) -> None:
        """The queue delivered the drain's verdict: released (the group is done with), or still held after
        --gpu-drain-timeout (``held`` is the failure the next start reports; the drain runs again before the start
        after that)."""
        self.draining = False
        group, started, held = verdict
        if isinstance(held, Exception):
            self.log.warning("could not read the GPU memory of the previous workers (%s: %s); starting new workers "
                             "anyway", type(held).__name__, held)
            self._drained = group
            return
        if not held:
            waited = time.monotonic() - started
            if waited >= 0.5:
                self.log.info("the last workers' GPU memory was released after %.1f s", waited)
            self._drained = group
            return
        who = ", ".join(f"pid {pid} ({size / 2**20:.0f} MiB)" for pid, size in sorted(held.items()))
        message = (f"GPU memory of the previous workers is still held {self.cfg.gpu_drain_timeout:g} s after they "
                   f"were stopped (--gpu-drain-timeout): {who}; new workers would run out of memory")
        self.log.error("%s", message)
        self.held = Failure(message=message, time=time.time(), round=round_number, node=self.cfg.node_id)
