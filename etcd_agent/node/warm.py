"""Warm restarts (``--warm-restart``): one pre-started interpreter per local rank, handed the next round.

While a round runs, the agent keeps one *spare* per local rank: a ``python -u`` started with the part of that
rank's worker environment that is known before the next round (``known_env``: everything but ``ROUND_KEYS``),
which has already imported the ``--preload`` modules (default ``torch`` and ``torch._dynamo``; ``spare.py`` is its
side). When the next
round starts, ``WorkerGroup.start`` hands each spare its worker's final environment, command line, stdout and
stderr (``Spare.hand``), and the spare runs the entrypoint as ``python script.py`` / ``python -m module`` would.
A restarted worker so skips the interpreter start and the imports: on this machine's CPU torch, most of a cold
start; on a GPU machine the CUDA context and NCCL set-up still happen after the handoff, in the worker.

Rules:

- A spare is a worker in waiting: its own session and process group, the agent's parent-death signal (it is
  spawned on the agent's main thread, like workers), its output in ``<run>/spares/<node>/local_rank_<n>.log`` under
  the log directory until the handoff (made as ``logtree`` says: private, never through a symlink; a tree that is
  not the agent's is a ConfigError at start, and later turns warm restarts off with one warning). It never imports
  anything but ``--preload`` before the handoff, and a preload that initialised CUDA is refused (``spare.py``); with
  NVML, a spare that holds GPU memory is not used.
- ``take`` gives a spare only when it is alive, has not reported a failed preload, was started with exactly the
  known part of the worker's environment, and the files of its preloaded modules have not changed since it
  imported them. Any other spare is killed and the worker starts cold; the reason is logged. A spare still
  importing is used: it runs the entrypoint as soon as its imports finish, if they finish within ``cold_after``
  seconds of the handoff (``COLD_FACTOR`` times the longest the first spares' imports took at start, at least
  ``COLD_AFTER_MIN``); otherwise it makes itself the cold worker (``spare.py``: the same process ``exec``s the cold
  command line) and the agent logs one warning. A warm start is so never later than a cold one by more than
  ``cold_after``, and a ``--preload`` that hangs never leaves a worker unstarted.
- ``fill`` (the agent's main thread only) starts the missing spares: at start, where ``wait_ready`` makes a
  ``--preload`` that cannot be imported a ConfigError before the job is joined (these run at normal priority: the
  agent waits for them, and they become round 1's workers), and again as soon as a round started (``due`` is then
  now; the last warm handoff of the round starts them itself), so that a worker that fails in its first seconds
  restarts warm too. These spares run at the lowest CPU and I/O priority (``priority.py``: ``SCHED_IDLE``, the
  idle I/O class, their autogroup at nice 19) from their first instruction, so they never take a cycle or a disk
  request the workers want; ``take`` gives a spare the agent's own priority back before its handoff, and a spare
  whose priority could not be given back is killed (its worker starts cold).
- Where this agent may not give a process its priority back (``priority.probe`` at pool creation: no
  CAP_SYS_NICE and too low an RLIMIT_NICE), spares run at normal priority and are started ``REFILL_DELAY`` s after
  each round started, so their imports do not compete with the new workers' first steps for CPU; one log line says
  why.
- A preload that fails later (the module became unimportable mid-job) turns warm restarts off for the rest of the
  job, with one warning; workers then start cold.
- ``close`` kills every spare; the agent calls it when it exits.

Imports ``config``, ``errors``, ``gpu``, ``logs``, ``logtree``, ``priority`` and ``proctree`` from the package; never
torch, ``etcd/`` or ``coord/``.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Mapping

from .. import proctree
from . import gpu, logtree, priority
from ..config import WorkerConfig
from ..errors import ConfigError
from ..logs import Log, get as get_logger

log = get_logger("etcd_agent.node.warm")

SPARE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spare.py")
# What a worker's environment holds that depends on the round: a spare is started without these.
ROUND_KEYS = frozenset({
    "RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR",
    "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_ERROR_FILE", "ETCD_AGENT_ROUND",
    "ETCD_AGENT_PROGRESS_FILE",
})
READY_WAIT = 120.0  # at start: how long the first spares may take to import --preload before the job goes on
REFILL_DELAY = 5.0  # without idle priority: seconds after a round started before the next round's spares start
_HAND_TIMEOUT = 5.0  # a handoff that cannot be written in this time (the spare does not read) goes cold
COLD_FACTOR = 2.0  # a spare handed a round while importing goes cold after this many times the first imports took
COLD_AFTER_MIN = 5.0  # ... and never sooner than this many seconds after the handoff
_KILL_WAIT = 5.0
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse_preload(text: str, flag: str = "--preload") -> tuple[str, ...]:
    """``torch,numpy`` -> module names; "" preloads nothing (a pre-started interpreter only)."""
    names = tuple(n.strip() for n in (text or "").split(",") if n.strip())
    for name in names:
        if not _MODULE_RE.fullmatch(name):
            raise ConfigError(f"{flag} {text!r}: {name!r} is not a module name such as torch or numpy.linalg")
    return tuple(dict.fromkeys(names))


def known_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of a worker's environment that is known before its round: what a spare is started with."""
    return {k: v for k, v in env.items() if k not in ROUND_KEYS}


def _differs(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


@dataclass
class Spare:
    """One pre-started interpreter for one local rank."""

    local_rank: int
    proc: subprocess.Popen
    sock: socket.socket
    env: dict[str, str]  # the known environment it was started with
    idle: bool = False  # started at the lowest CPU and I/O priority (priority.py)
    started: float = field(default_factory=time.monotonic)
    ready_after: float | None = None  # seconds from its start to "ready", once it said so
    error: str | None = None
    modules: dict[str, tuple[str, float | None]] = field(default_factory=dict)  # name -> (file, mtime at ready)
    _buf: bytes = b""
    _eof: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def said(self) -> bool:
        """It reported (ready or a failed preload)."""
        return self.ready_after is not None or self.error is not None

    def read(self) -> None:
        """Take in what the spare wrote, without blocking."""
        while not self._eof and not self.said:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._eof = True
                return
            self._buf += chunk
            if b"\n" in self._buf:
                line = self._buf.split(b"\n", 1)[0]
                try:
                    msg = json.loads(line)
                except ValueError:
                    self.error = f"its report was not valid JSON: {line[:200]!r}"
                    return
                if msg.get("error"):
                    self.error = str(msg["error"])
                else:
                    self.ready_after = time.monotonic() - self.started
                    self.modules = {name: (path, _mtime(path)) for name, path in (msg.get("modules") or {}).items()}

    def changed_modules(self) -> list[str]:
        return [name for name, (path, mtime) in self.modules.items() if path and _mtime(path) != mtime]

    def hand(self, msg: dict, fds: list[int]) -> None:
        """Send the handoff (the worker's command line and environment) with its stdout and stderr; OSError when
        the spare is gone or does not read."""
        payload = json.dumps(msg).encode()
        data = b"%d\n" % len(payload) + payload
        self.sock.settimeout(_HAND_TIMEOUT)
        keep = False
        try:
            sent = socket.send_fds(self.sock, [data], fds)
            if sent < len(data):
                self.sock.sendall(data[sent:])
            keep = not self.said  # still importing: its next word says whether it went cold (``word``)
        finally:
            if not keep:
                self.sock.close()  # what was sent stays readable for the spare

    def word(self, timeout: float) -> dict | None:
        """After a handoff while it was importing: its next report (``{"ready": ...}``, ``{"cold": why}``, ...),
        ``{}`` when it ended without one, None when it said nothing for ``timeout`` s. Closes the socket."""
        deadline = time.monotonic() + timeout
        buf = b""
        try:
            while b"\n" not in buf and (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                chunk = self.sock.recv(4096)
                if not chunk:
                    return {}
                buf += chunk
        except socket.timeout:
            return None
        except OSError:
            return {}
        finally:
            self.sock.close()
        if b"\n" not in buf:
            return None
        try:
            msg = json.loads(buf.split(b"\n", 1)[0])
        except ValueError:
            return {}
        return msg if isinstance(msg, dict) else {}

    def kill(self) -> None:
        """SIGKILL its process group and reap it."""
        if self.proc.poll() is None:  # unreaped: its pid, the group's id, is still its own
            proctree.kill_group(self.pid, signal.SIGKILL)
            self.proc.kill()  # the spare itself, should it have left its group
        try:
            self.proc.wait(_KILL_WAIT)
        except subprocess.TimeoutExpired:
            log.error("warm spare pid %d is still alive %.0f s after SIGKILL", self.pid, _KILL_WAIT)
        self.sock.close()


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


class SparePool:
    """This node's spares, one per local rank; ``take`` on the round's start, ``fill`` from the agent's main thread."""

    def __init__(self, cfg: WorkerConfig, log_dir: str, run_id: str, node_id: str, logger: Log | None = None,
                 gpus: bool = False):
        self.cfg = cfg
        self.preload = tuple(cfg.preload)
        self._root, self._parts = log_dir, [run_id, "spares", node_id or "-"]
        self.directory = os.path.join(log_dir, *self._parts)
        self._log = logger or log
        self._gpus = gpus  # a GPU job: a spare holding GPU memory (NVML) is not used
        self._spares: dict[int, Spare] = {}
        self._known: dict[int, dict[str, str]] = {}  # local rank -> the known env of its last worker
        self.due: float | None = None  # monotonic time of the next fill, when spares are missing
        self.disabled = ""  # why warm restarts are off for the rest of the job
        self.handed = 0  # workers started warm, for the logs and tests
        self.import_time = 0.0  # the longest the spares started at normal priority took to import --preload
        self.not_idle = priority.probe()  # why spares cannot run at idle priority ("" when they can)
        if self.not_idle:
            self._log.info("warm spares run at normal priority and start %.0f s after each round started, because "
                           "this agent cannot give a process its priority back after SCHED_IDLE: %s", REFILL_DELAY,
                           self.not_idle)

    @property
    def pids(self) -> dict[int, int]:
        """local rank -> pid of its spare."""
        return {rank: s.pid for rank, s in self._spares.items()}

    def fill(self, envs: Mapping[int, Mapping[str, str]] | None = None) -> None:
        """Start a spare for every local rank without one; ``envs`` (local rank -> a worker environment) at start,
        later the environments of the last workers. Spares started with ``envs`` run at normal priority (the agent
        waits for them), the others at idle priority unless ``not_idle``. Call from the agent's main thread (the
        parent-death signal)."""
        self.due = None
        if self.disabled:
            return
        idle = envs is None and not self.not_idle
        for rank, env in (envs or {}).items():
            self._known[rank] = known_env(env)
        for rank in range(self.cfg.nproc):
            if rank not in self._spares and rank in self._known:
                try:
                    self._spares[rank] = self._spawn(rank, self._known[rank], idle)
                except ConfigError as exc:  # the log tree is not the agent's: at start an error, later no spares
                    if envs is not None:
                        raise
                    self.disabled = str(exc)
                    self._log.warning("warm restarts are off for the rest of the job: %s", exc)
                    return

    @property
    def cold_after(self) -> float:
        """Seconds a spare handed a round while importing may take to finish before it starts the worker cold."""
        return max(COLD_FACTOR * self.import_time, COLD_AFTER_MIN)

    def fill_due(self) -> None:
        """Start the missing spares now if they are due (the last warm handoff of a round calls it, inside the
        group's start: a spare that cannot be started is logged, and the agent's loop tries again later)."""
        if self.due is None or self.due > time.monotonic():
            return
        try:
            self.fill()
        except OSError as exc:
            self.due = time.monotonic() + REFILL_DELAY
            self._log.warning("could not start the warm spares for the next round (%s); trying again in %.0f s",
                              exc, REFILL_DELAY)

    def _spawn(self, rank: int, env: dict[str, str], idle: bool = False) -> Spare:
        with logtree.opened(self._root, self._parts) as fd:
            name = f"local_rank_{rank}.log"
            out = logtree.open_append(fd, name, os.path.join(self.directory, name))
        with out:
            return self._start(rank, env, idle, out)

    def _start(self, rank: int, env: dict[str, str], idle: bool, out) -> Spare:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        conf = {"preload": list(self.preload), "module": self.cfg.module, "entrypoint": self.cfg.entrypoint,
                "local_rank": rank}
        argv = [self.cfg.command()[0], "-u", SPARE_FILE, str(child.fileno()), json.dumps(conf)]
        steps = [proctree.pdeathsig_preexec(os.getpid()), priority.idle_preexec() if idle else None]
        try:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True, pass_fds=(child.fileno(),),
                                    preexec_fn=proctree.chain_preexec(steps))
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent.setblocking(False)
        self._log.debug("started warm spare pid %d for local rank %d at %s priority (preload: %s)", proc.pid,
                        rank, "idle" if idle else "normal", ", ".join(self.preload) or "nothing")
        return Spare(rank, proc, parent, env, idle)

    def wait_ready(self, timeout: float = READY_WAIT) -> None:
        """At start: wait until every spare reported; a preload that failed is a ConfigError naming --preload."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = []
            for s in self._spares.values():
                s.read()
                if s.error is not None:
                    self.close()
                    raise ConfigError(f"--preload {','.join(self.preload)}: the workers' Python "
                                      f"({self.cfg.command()[0]}) could not preload it: {s.error}")
                if not s.said and s.proc.poll() is not None:
                    code = s.proc.returncode
                    self.close()
                    raise ConfigError(f"--warm-restart: the warm spare for local rank {s.local_rank} ended with "
                                      f"{proctree.describe_exit(code)} before it was ready; see {self.directory}")
                if not s.said:
                    waiting.append(s)
            if not waiting:
                took = max((s.ready_after or 0.0) for s in self._spares.values()) if self._spares else 0.0
                self.import_time = max(self.import_time, took)
                self._log.info("%d warm spare(s) ready after %.1f s (preloaded: %s)", len(self._spares), took,
                               ", ".join(self.preload) or "nothing")
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self._log.warning("%d warm spare(s) are still importing %s after %.0f s; going on (they are used "
                                  "once ready)", len(waiting), ", ".join(self.preload), timeout)
                return
            select.select([s.sock for s in waiting], [], [], min(left, 1.0))

    def take(self, local_rank: int, env: Mapping[str, str]) -> Spare | None:
        """The spare to hand ``env``'s worker to, or None (the worker starts cold; the reason is logged)."""
        self._known[local_rank] = known_env(env)
        self.due = time.monotonic() + (REFILL_DELAY if self.not_idle else 0.0)
        spare = self._spares.pop(local_rank, None)
        if spare is None:
            if not self.disabled:
                self._log.info("no warm spare for local rank %d yet: it starts cold", local_rank)
            return None
        why = self._unusable(spare, env) or self._restore(spare)
        if why:
            self._log.warning("the warm spare for local rank %d (pid %d) %s; the worker starts cold", local_rank,
                              spare.pid, why)
            spare.kill()
            return None
        self.handed += 1
        return spare

    def _unusable(self, s: Spare, env: Mapping[str, str]) -> str:
        s.read()
        code = s.proc.poll()
        if code is not None:
            return f"died before use ({proctree.describe_exit(code)})"
        if s.error is not None:
            self.disabled = s.error
            self._log.warning("warm restarts are off for the rest of the job: %s", s.error)
            return f"could not preload: {s.error}"
        keys = _differs(s.env, known_env(env))
        if keys:
            return f"is stale: the worker's environment changed since it started ({', '.join(keys[:8])})"
        changed = s.changed_modules()
        if changed:
            return f"is stale: the files of {', '.join(changed)} changed since it imported them"
        if self._gpus:
            held = gpu.holders([s.pid])
            if held:
                return f"holds GPU memory ({held[s.pid] / 2**20:.0f} MiB) before it was handed a round"
        return ""

    def _restore(self, s: Spare) -> str:
        """Give an idle spare the agent's own priority, before it is handed a round; what went wrong, or ""."""
        if not s.idle:
            return ""
        try:
            priority.restore(s.pid, priority.own())
        except OSError as exc:
            return f"could not be given the agent's CPU and I/O priority back ({exc})"
        s.idle = False
        return ""

    def close(self) -> None:
        spares, self._spares = list(self._spares.values()), {}
        for s in spares:
            s.kill()
        if spares:
            self._log.debug("stopped %d warm spare(s)", len(spares))

