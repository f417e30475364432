"""The health gate: before joining a round an agent checks its node, and an unhealthy node does not join.

Two checks, in order:
- GPUs, through NVML (``gpu.py``), when the job's workers are GPU workers (``--nproc-per-node gpu``): the expected
  number visible, none with pages pending retirement or uncorrectable ECC errors. Without NVML this check is skipped
  (said once).
- ``--health-check CMD``: the operator's own command, run without a shell (``shlex`` splits it), exit 0 = healthy,
  killed with its process group after ``--health-check-timeout`` seconds (which counts as unhealthy); the first line
  of its output is the reason given. Its output is read against that same deadline, never beyond it: a check whose
  output a process it started still holds at the deadline (one that left its process group, so the kill misses it)
  has not finished, whatever its own exit status. Its program must be found (``shutil.which``) when the agent
  starts: a ConfigError naming the flag otherwise.

An unhealthy node records why in its registry entry (``P/nodes/<node>`` ``health``), where ``status`` and ``events``
show it; the round leader does not wait for it (the fast path and scale-up count healthy nodes only), and the node
checks again after a backoff (``BACKOFF``).

Quarantine (``QuarantinePolicy``): a node whose workers failed K times within a window sits out for a cooldown.
Its failures are counted job-wide in ``P/quarantine/<node>`` (unleased: an agent started again on the node finds
them), each one recorded by the node itself at its next join; while it sits out, the health gate says so.
Imports ``errors``, ``gpu`` and ``values``.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import time

from . import gpu
from ..errors import ConfigError
from ..schema.values import Quarantine

BACKOFF = (5.0, 10.0, 20.0, 40.0, 60.0)  # seconds until the next check after 1, 2, ... failed checks in a row


def backoff(failures: int) -> float:
    """Seconds to wait before checking again after ``failures`` (1 or more) failed checks in a row."""
    return BACKOFF[min(max(failures, 1), len(BACKOFF)) - 1]


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    command: tuple[str, ...] = ()  # --health-check, split; () when not given
    timeout: float = 60.0  # --health-check-timeout
    gpus: int | None = None  # GPUs this node's workers use (--nproc-per-node gpu); None: not a GPU job

    @property
    def active(self) -> bool:
        return bool(self.command) or self.gpus is not None

    @classmethod
    def parse(cls, command: str | None, timeout: float, gpus: int | None) -> HealthConfig:
        if not timeout > 0:
            raise ConfigError(f"--health-check-timeout must be positive, got {timeout}")
        try:
            argv = tuple(shlex.split(command)) if command else ()
        except ValueError as exc:
            raise ConfigError(f"--health-check {command!r}: {exc}") from exc
        if command is not None and not argv:
            raise ConfigError("--health-check is empty: give a command, or leave the flag out")
        if argv and shutil.which(argv[0]) is None:
            where = "is not an executable file" if os.sep in argv[0] else "is not found on PATH"
            raise ConfigError(f"--health-check {command!r}: the program {argv[0]!r} {where}")
        return cls(argv, timeout, gpus)


def check(cfg: HealthConfig, nvml=None, env: dict | None = None, started=None) -> str:
    """``""`` when this node is healthy, else one line saying why. ``started(proc)`` is told the command's process
    (its own process group) as soon as it runs, so that an owner that exits first can kill it."""
    if cfg.gpus is not None:
        found = gpu.problems(cfg.gpus, nvml)
        if found:
            return "; ".join(found)
    if cfg.command:
        return _run(cfg, env, started)
    return ""


def _run(cfg: HealthConfig, env: dict | None, started=None) -> str:
    what = f"--health-check {shlex.join(cfg.command)}"
    try:
        proc = subprocess.Popen(cfg.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    except OSError as exc:
        return f"{what} could not run: {exc.strerror or exc}"
    if started is not None:
        started(proc)
    try:
        out, _ = proc.communicate(timeout=cfg.timeout)
    except subprocess.TimeoutExpired:
        return _timed_out(proc, what, cfg.timeout)
    if proc.returncode == 0:
        return ""
    said = next((line.strip() for line in out.decode(errors="replace").splitlines() if line.strip()), "")
    how = f"exit code {proc.returncode}" if proc.returncode > 0 else f"signal {signal.Signals(-proc.returncode).name}"
    return f"{what} failed with {how}" + (f": {said[:200]}" if said else "")


DRAIN = 0.5  # seconds the output of a killed check may take to close: a process outside its group may hold it


def _timed_out(proc: subprocess.Popen, what: str, timeout: float) -> str:
    """The check ran past its deadline: kill its process group, give its output DRAIN seconds to close, then let
    go of it (a process that left the group keeps it open, and is none of the agent's business)."""
    exited = proc.poll() is not None  # the command itself had finished: something it started held the output
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and whatever it started in its group
    except ProcessLookupError:
        pass
    held = False
    try:
        proc.communicate(timeout=DRAIN)
    except subprocess.TimeoutExpired:
        held = True
        proc.stdout.close()
        try:
            proc.wait(timeout=DRAIN)
        except subprocess.TimeoutExpired:
            pass
    said = f"{what} did not finish within {timeout:g} s (--health-check-timeout)"
    if held:
        return said + (": a process it started still holds its output (it left the check's process group, so it "
                       "was not killed)")
    if exited:
        return said + ": it exited, but a process it started held its output open until it was killed"
    return said


MAX_PERIOD = 365 * 24 * 3600.0  # the longest quarantine window and cooldown: a quarantine's end is a time to print


@dataclasses.dataclass(frozen=True)
class QuarantinePolicy:
    """``--quarantine-after K`` failures of this node's workers within ``--quarantine-window`` seconds make it sit out
    for ``--quarantine-cooldown`` seconds (K = 0: off)."""

    after: int = 0
    window: float = 600.0
    cooldown: float = 600.0

    @property
    def active(self) -> bool:
        return self.after > 0

    def __post_init__(self) -> None:
        if self.after < 0:
            raise ConfigError(f"--quarantine-after must be 0 (off) or more, got {self.after}")
        if not 0 < self.window <= MAX_PERIOD or not 0 < self.cooldown <= MAX_PERIOD:  # inf, nan: no wall time
            raise ConfigError(f"--quarantine-window and --quarantine-cooldown must be positive and at most "
                              f"{MAX_PERIOD:.0f} s (a year), got {self.window:g} and {self.cooldown:g}")


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
