"""This node's workers across rounds: one group per round (``api.Group``, made by a ``GroupFactory``), how the
latest round ended here, and the warm spares (``--warm-restart``) that the next round's workers start from.

Guarantees:

- The supervisor is the one owner of this node's worker state: the round whose workers run or ran here, whether
  they run (started and not stopped, not all finished), and the round's outcome with its failure report. The agent
  reads it before each decision; nothing else keeps a copy.
- A group's event counts only for the round it is running now: ``GroupSucceeded`` ends it ``succeeded``,
  ``GroupFailed`` ``failed`` with its report (the root cause; logged once). A failure of its own posted after the
  agent stopped that group for another reason is handed back (``failed``) so that its report is still recorded; an
  event of an older round's group is no news.
- Before new workers start, the last group's workers must have released their GPU memory (``checks.Checks``): while
  the drain runs nothing starts; memory still held after ``--gpu-drain-timeout`` fails the round here instead. The
  drain starts when the workers are stopped for a new round, so it runs while that round forms.
- Stopping forwards the signal the agent is leaving on (``--signals-to-handle``), as torchrun does; else SIGTERM.
- The node's training step (``steps.StepMeter``) is read from the current group's progress files; a failure report
  carries the step the node had reached when it failed.

Imports ``config``, ``logs``, ``metrics``, ``schema.values`` and ``node/`` (``api``, ``checks``, ``env``, ``steps``,
``warm``) only; never ``etcd/``, ``coord/`` or the agent.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Callable

from .. import logs, metrics
from ..config import AgentConfig, worker_base_env
from ..schema.values import Failure, Outcome
from .api import Assignment, Group, GroupEvent, GroupFactory, GroupFailed, GroupSucceeded
from .checks import Checks
from .env import log_root, worker_env
from .steps import Reading, StepMeter
from .warm import SparePool


class Supervisor:
    """This node's workers, one round at a time (see the module doc)."""

    def __init__(self, cfg: AgentConfig, post: Callable[[GroupEvent], None], factory: GroupFactory,
                 checks: Checks, where: logs.Where, log: logs.Log):
        self.cfg, self._post, self._factory, self._checks = cfg, post, factory, checks
        self._where, self.log = where, log
        self.group: Group | None = None
        self.round = 0  # the round whose workers run or ran here (0: none)
        self.running = False  # they run: started, not stopped, not all finished
        self.outcome: Outcome | None = None  # how they ended, once known
        self.failure: Failure | None = None  # this node's failure report when they failed
        self.spares: SparePool | None = None  # --warm-restart: this node's pre-started interpreters
        self.members = 1  # the size of the plan of the round whose workers run or ran here
        self.steps = StepMeter(lambda: (self.round, self.group.progress_files if self.group is not None else ()), log)
        if cfg.workers.warm_restart:
            self.spares = SparePool(cfg.workers, log_root(cfg.workers, log), cfg.run_id, cfg.node_id,
                                    logs.get("etcd_agent.node.warm", where), gpus=cfg.health.gpus is not None)
            metrics.track_spares(lambda: len(self.spares.pids) if self.spares is not None else 0)

    def prepare(self) -> None:
        """At start: the spares of round 1 (a ``--preload`` that cannot be imported is a ConfigError now)."""
        if self.spares is None:
            return
        nproc = self.cfg.workers.nproc
        a = Assignment(run_id=self.cfg.run_id, round=0, group_rank=0, group_world_size=1, rank_offset=0,
                       world_size=nproc, master_addr="", master_port=0, restart_count=0,
                       max_restarts=self.cfg.spec.max_restarts)
        base = worker_base_env()
        self.spares.fill({i: worker_env(self.cfg.workers, a, i, base, "") for i in range(nproc)})
        self.spares.wait_ready()

    def refill(self) -> float | None:
        """--warm-restart: start the spares for the next round once they are due; returns when they are."""
        if self.spares is None or self.spares.due is None:
            return None
        if time.monotonic() < self.spares.due:
            return self.spares.due
        self.spares.fill()
        return None

    def start(self, a: Assignment) -> str | None:
        """Start round ``a.round``'s workers; what was started, for the log. None when they do not start now: the
        last workers' GPU memory is being drained (nothing starts yet), or it was still held (the round failed)."""
        self.log.debug("round %d's plan names this node (group rank %d): starting its workers", a.round, a.group_rank,
                       round=a.round)  # the crash path's "plan read" step (tools/bench/crash_timeline.py)
        if self._checks.held is not None:  # the last workers' GPU memory was not released in time
            held, self._checks.held = dataclasses.replace(self._checks.held, round=a.round), None
            self.round, self.running, self.outcome, self.failure = a.round, False, Outcome.FAILED, held
            return None  # decide() counts it as this node's failure in this round
        if self._checks.must_drain(self.group):
            return None  # the drain runs off the loop; decide() waits for its verdict
        self.group = self._factory(self.cfg.workers, self._post, node_id=self.cfg.node_id,
                                   logger=logs.get("etcd_agent.node.workers", self._where),
                                   worker_timeout=self.cfg.worker_timeout, spares=self.spares)
        self.round, self.running, self.outcome, self.failure = a.round, True, None, None
        self.members = a.group_world_size
        self.group.start(a)
        return self.group.describe(a)

    def stop(self, why: str, sig: int = 0, next_round: bool = False) -> None:
        """Stop the workers (``sig``, the signal the agent leaves on, else SIGTERM); also reaps what a finished
        group left behind. ``next_round``: new workers will start here; a GPU job's memory drain begins now, so its
        verdict is usually in before the next round's plan is (the drain's time runs from the stop either way)."""
        self.running = False
        if self.group is not None:
            self.group.stop(why, sig=sig or signal.SIGTERM)
            if next_round:
                self._checks.must_drain(self.group)

    def fence(self, why: str, grace: float) -> None:
        """From the keepalive thread, the moment the session is lost: stop the workers within ``grace``."""
        group = self.group
        if group is not None:
            group.stop(f"self-fencing: {why}", grace=grace)

    def forget(self) -> None:
        """The round's outcome is reported and the round left (a fenced agent rejoins)."""
        self.outcome = self.failure = None

    def succeeded(self, e: GroupSucceeded) -> None:
        if self._current(e.round) and self.outcome is None:
            self.log.info("all %d local worker(s) finished successfully", self.cfg.workers.nproc,
                          event="workers_finished")
            self.outcome, self.running = Outcome.SUCCEEDED, False

    def failed(self, e: GroupFailed) -> Failure | None:
        """Take the round's failure; returns a report to record at once (its group was stopped meanwhile)."""
        if e.round != self.round:
            return None  # a group of an earlier round
        step = self.steps.step()  # the step the node had reached: the report records it
        r = e.report if step is None else dataclasses.replace(e.report, step=step)
        if not self._current(e.round):
            code = self.cfg.no_restart_exit_code
            if self.outcome is None and code is not None and r.exitcode == code:
                self.outcome, self.failure = Outcome.FAILED, r  # a peer restarted first: it still ends the job
            return r  # it failed on its own just before we stopped the group for another reason: keep it
        if self.outcome is None:
            if r.rank is None:  # the group as a whole (torchrun's agent restarted it)
                self.log.error("%s", r.describe(), event="worker_failed")
            elif not r.hang:  # a hang was said where it was found
                self.log.error("worker rank %d (pid %d) failed with %s%s", r.rank, r.pid, r.how_it_ended(),
                               f": {r.message}" if r.message else "", event="worker_failed",
                               fields={"rank": r.rank, "exit": r.how_it_ended()})
            self.outcome, self.failure = Outcome.FAILED, r
        return None

    def progress(self) -> Reading | None:
        """The node's step reading (with its plan's size) for the publisher: None while its workers have no
        progress files (none started yet, or a group without them: stand-ins, torchrun's); a step of None while
        none of them reported a step this round."""
        if self.group is None or not self.group.progress_files:
            return None
        reading = self.steps.sample() or Reading(self.round, None, 0.0)
        return dataclasses.replace(reading, members=self.members)

    def _current(self, rnd: int) -> bool:
        """Whether the group of round ``rnd`` is the one running now (not stopped by the agent)."""
        return self.group is not None and rnd == self.round and self.running

    def close(self) -> None:
        if self.spares is not None:
            self.spares.close()
