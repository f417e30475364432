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
The records (``HealthConfig``, ``QuarantinePolicy``) are in ``config``, the quarantine arithmetic in
``coord.quarantine``. Imports ``config``, ``errors``, ``proctree`` and ``node.gpu``; never ``etcd/`` or ``coord/``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess

from .. import proctree
from ..config import HealthConfig
from ..errors import ConfigError
from . import gpu

BACKOFF = (5.0, 10.0, 20.0, 40.0, 60.0)  # seconds until the next check after 1, 2, ... failed checks in a row


def parse(command: str | None, timeout: float, gpus: int | None) -> HealthConfig:
    """The health gate of ``--health-check`` and ``--health-check-timeout`` (``gpus``: the GPUs a GPU job's workers
    use); ConfigError names the flag, and a program that is not there is one at start."""
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
    return HealthConfig(argv, timeout, gpus)


def backoff(failures: int) -> float:
    """Seconds to wait before checking again after ``failures`` (1 or more) failed checks in a row."""
    return BACKOFF[min(max(failures, 1), len(BACKOFF)) - 1]


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
    return f"{what} failed with {proctree.describe_exit(proc.returncode)}" + (f": {said[:200]}" if said else "")


DRAIN = 0.5  # seconds the output of a killed check may take to close: a process outside its group may hold it


def _timed_out(proc: subprocess.Popen, what: str, timeout: float) -> str:
    """The check ran past its deadline: kill its process group, give its output DRAIN seconds to close, then let
    go of it (a process that left the group keeps it open, and is none of the agent's business)."""
    exited = proc.poll() is not None  # the command itself had finished: something it started held the output
    # The command and whatever it started in its group. Reaped, its pid may belong to another process by now; but the
    # group's id cannot be reused while a process it started (the one holding the output) is still in the group.
    proctree.kill_group(proc.pid, signal.SIGKILL)
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
