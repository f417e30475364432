"""Starting a worker process that cannot outlive the agent, without forking the agent.

``popen_orphan_proof`` is ``subprocess.Popen`` in a new session with the parent-death signal SIGKILL armed before
the worker's program runs. The plain way, a ``preexec_fn`` that calls prctl (``proctree.pdeathsig_preexec``), makes
CPython fork the whole agent and run Python in the child: 5-20 ms per worker on a loaded 2-core machine, while the
agent's loop waits. Without a ``preexec_fn`` CPython uses vfork (well under 1 ms), so the signal is armed by a
prefix instead (``pdeathsig_argv``):

    setpriv --pdeathsig KILL -- dash -c CHECK sh <agent pid> <PWD> <the worker's argv...>

setpriv (util-linux 2.33 or later) arms the signal and executes dash; dash checks that its parent is still the
agent (one that died before the signal was armed would leave the worker orphaned: then it exits 1, as the
``preexec_fn`` does), puts back ``PWD`` as the worker's environment has it (dash sets it at start), and executes the
worker's program in its place: the same pid, process group and session, the environment unchanged.

Guarantees: the prefix is used only where a probe (once per process) showed it arms the signal and passes an
environment through exactly; only for an environment dash passes on as it is (every name a shell variable name, so
no ``BASH_FUNC_x%%`` or ``a.b``, which dash drops, and none of ``IFS``, ``OPTIND``, ``PPID``, which it resets); and
only for a program that is a binary (a script is run by its interpreter through the kernel, as Popen does, and dash
would run a script without a ``#!`` line itself). Otherwise the ``preexec_fn``. A program that cannot be found or
run is started directly too, so the error is the one Popen raises.

Imports ``proctree`` only; never ``etcd/``, ``coord/`` or the agent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading

from .. import proctree

# After setpriv armed the signal: the agent is still the parent, PWD as the worker's environment has it ("-": none),
# then the worker's program in dash's place.
_CHECK = ('[ "$PPID" = "$1" ] || exit 1; case $2 in -) unset PWD;; *) PWD=${2#=}; export PWD;; esac; '
          'shift 2; exec "$@"')
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RESET = frozenset(("IFS", "OPTIND", "PPID"))  # dash sets these at start whatever the environment says
# What the probe passes through: dash's own variables, a stale PWD, a name it would drop if it were not checked.
_PROBE_ENV = {"ETCD_AGENT_PROBE": "1", "PS1": "a", "PS2": "b", "PS4": "c", "LINENO": "7", "MAIL": "m",
              "MAILPATH": "n", "PATH": "/nonexistent", "TERM": "t", "HISTSIZE": "3", "ENV": "/nonexistent", "_": "u",
              "SHLVL": "9", "OLDPWD": "/o", "PWD": "/nonexistent/etcd-agent-probe"}
_lock = threading.Lock()
_armer: list[str] | None = None  # the prefix up to the agent's pid, once probed ([]: not usable here)


def pdeathsig_argv(parent_pid: int, env: dict[str, str]) -> list[str] | None:
    """The argv prefix that arms SIGKILL on the parent's death and then runs the rest with ``env`` unchanged (see
    the module doc); None where it is not usable here (then ``proctree.pdeathsig_preexec`` is the way)."""
    global _armer
    if not sys.platform.startswith("linux"):
        return None
    with _lock:
        if _armer is None:
            _armer = _probe()
    pwd = "=" + env["PWD"] if "PWD" in env else "-"
    return [*_armer, str(parent_pid), pwd] if _armer else None


def popen_orphan_proof(argv: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(argv, env=env, **kwargs)`` in a new session, no descriptor inherited but the streams, the
    parent-death signal SIGKILL armed before ``argv`` runs: it cannot outlive the thread that calls this."""
    prefix = pdeathsig_argv(os.getpid(), env)
    program = shutil.which(argv[0], path=env.get("PATH", os.defpath)) if prefix is not None else None
    if prefix is not None and program and _is_binary(program) and _passed_as_is(env):
        return subprocess.Popen([*prefix, *argv], env=env, start_new_session=True, close_fds=True, **kwargs)
    return subprocess.Popen(argv, env=env, start_new_session=True, close_fds=True,
                            preexec_fn=proctree.pdeathsig_preexec(os.getpid()), **kwargs)


def _passed_as_is(env: dict[str, str]) -> bool:
    """Whether dash passes ``env`` on unchanged (PWD aside, which the prefix puts back)."""
    return all(_NAME.fullmatch(name) for name in env) and not _RESET.intersection(env)


def _is_binary(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _probe() -> list[str]:
    """The prefix, if here it runs a program with its environment passed through exactly (a stale PWD, and none)."""
    setpriv, dash, env_cmd = shutil.which("setpriv"), shutil.which("dash"), shutil.which("env")
    if not setpriv or not dash or not env_cmd:
        return []
    armer = [setpriv, "--pdeathsig", "KILL", "--", dash, "-c", _CHECK, "sh"]
    for env in (_PROBE_ENV, {"ETCD_AGENT_PROBE": "1"}):
        pwd = "=" + env["PWD"] if "PWD" in env else "-"
        try:
            done = subprocess.run([*armer, str(os.getpid()), pwd, env_cmd, "-0"], env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return []
        seen = dict(item.split(b"=", 1) for item in done.stdout.split(b"\0") if item)
        if done.returncode != 0 or seen != {k.encode(): v.encode() for k, v in env.items()}:
            return []
    return armer
