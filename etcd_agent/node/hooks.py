"""The scheduler hook, ``--on-quarantine CMD``: run once per quarantine that this node's agent writes, so that a
scheduler can drain the node (``deploy/slurm-drain-hook.sh``).

Guarantees: the command runs without a shell (``shlex`` splits it), on a thread of its own (the agent's loop never
waits for it), with ``ETCD_AGENT_QUARANTINE_NODE``, ``ETCD_AGENT_QUARANTINE_REASON``, ``ETCD_AGENT_QUARANTINE_UNTIL``
(wall seconds since 1970) and ``ETCD_AGENT_QUARANTINE_UNTIL_ISO`` (UTC) in its environment, in its own process
group, killed with that group after ``--on-quarantine-timeout`` seconds. Its failure, its timeout or a command that
cannot start is one warning in the agent's log, never an error of the agent or the job.

Imports ``errors``, ``proctree`` and ``schema.values`` only; never ``etcd/`` or ``coord/``.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time

from .. import proctree
from ..errors import ConfigError
from ..schema.values import Quarantine

ENV_PREFIX = "ETCD_AGENT_QUARANTINE_"
OUTPUT_LIMIT = 400  # characters of the hook's output a warning quotes


def parse(command: str | None) -> tuple[str, ...]:
    """``--on-quarantine`` split into argv (``()`` when not given); ConfigError names the flag."""
    if command is None:
        return ()
    try:
        argv = tuple(shlex.split(command))
    except ValueError as exc:
        raise ConfigError(f"--on-quarantine {command!r}: {exc}") from exc
    if not argv:
        raise ConfigError("--on-quarantine is empty: give a command, or leave the flag out")
    return argv


def environment(q: Quarantine, base: dict[str, str] | None = None) -> dict[str, str]:
    """The hook's environment: ``base`` (the agent's) plus the quarantine's node, reason and end."""
    env = dict(os.environ if base is None else base)
    env.update({ENV_PREFIX + "NODE": q.node, ENV_PREFIX + "REASON": q.reason, ENV_PREFIX + "UNTIL": f"{q.until:.0f}",
                ENV_PREFIX + "UNTIL_ISO": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(q.until))})
    return env


def run(argv: tuple[str, ...], timeout: float, q: Quarantine, log) -> str:
    """Run the hook for ``q`` and wait for it (at most ``timeout`` seconds): "" when it exited 0, else what went
    wrong, as logged."""
    what = f"--on-quarantine {shlex.join(argv)}"
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=environment(q), start_new_session=True)
    except OSError as exc:
        problem = f"{what} could not run: {exc.strerror or exc}"
    else:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proctree.kill_group(proc.pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
            problem = f"{what} did not finish within {timeout:g} s (--on-quarantine-timeout) and was killed"
        else:
            said = out.decode(errors="replace").strip()[-OUTPUT_LIMIT:]
            if proc.returncode == 0:
                log.info("%s ran for the quarantine of %s", what, q.node, event="quarantine_hook")
                return ""
            problem = (f"{what} failed with {proctree.describe_exit(proc.returncode)}"
                       + (f": {said}" if said else ""))
    log.warning("%s; the quarantine of %s stands, the job goes on", problem, q.node, event="quarantine_hook")
    return problem


def start(argv: tuple[str, ...], timeout: float, q: Quarantine, log) -> threading.Thread | None:
    """Run the hook for ``q`` on a thread of its own (None when no hook is configured)."""
    if not argv:
        return None
    thread = threading.Thread(target=run, args=(argv, timeout, q, log), name=f"on-quarantine-{q.node}", daemon=True)
    thread.start()
    return thread
