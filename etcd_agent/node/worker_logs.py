"""Where a worker's output goes: torchrun's console rules, our log files per round and rank, the error file.

Layout, one directory per worker and round (torchrun uses ``attempt_<N>/<local rank>``; ours names the round and
the global rank on purpose, so logs of different nodes and rounds never collide)::

    <log_dir>/<run_id>/job_<job:04d>/<node_id>/round_<round:04d>/rank_<global rank>/{stdout.log, stderr.log, error.json}
    <log_dir>/<run_id>/job_<job:04d>/<node_id>/round_<round:04d>/{filtered_stdout.log, filtered_stderr.log}

(``<node_id>/`` is left out when the node id is empty.) The tree is private and never followed through a symlink
(``logtree``): directories 0700, files 0600, every one made by the agent and opened relative to its parent's
descriptor; a symlink, another user's entry or one that others may write is refused with a ConfigError naming it.
Files are opened for appending; a stale error file is deleted (the name itself, never what it points to) before
each start, and files read back are opened without following a symlink.

Routing is torchrun 2.13's (``DefaultLogsSpecs.reify``), per local rank (``route``): a stream in
``--redirects | --tee`` goes to its log file and not the console; a teed stream also goes to the console line by
line, each line prefixed with torchrun's header ``[<role><local rank>]:`` (or ``$TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE``
with ``${role_name}``, ``${rank}``, ``${local_rank}`` substituted); any other stream goes to the console as the
worker wrote it. For a local rank outside ``--local-ranks-filter``, teed streams go to the file only and console
streams to /dev/null. Lines of the streams that are teed to the console which contain any duplicate filter
substring are also appended, with the header, to the round's ``filtered_stdout.log``/``filtered_stderr.log``
(created whenever that stream has filters, as torchrun does).

Guarantees:

- ``stderr.log`` always exists and receives the worker's stderr, wherever else it goes (console, or nowhere for a
  filtered rank), so failure reports have its tail. ``stdout.log`` exists only when stdout is redirected or teed.
- No pipe where none is needed: a file-only stream is written by the child straight into the file and console
  stdout is inherited (nothing in the agent can stall it). Teed streams and console stderr pass through one pump
  thread each, which reads until end of file.
- Console stderr is forwarded in raw chunks as read (``os.read`` of up to 64 KiB, written at once, no prefix, no
  line buffering), so ``\\r`` progress bars update live; teed streams are copied line by line.
- A console write is one call under one lock, so lines (or chunks) of different workers never mix. A console that
  is closed or gone, or a log file that cannot be written, never stops a pump (the worker would block on a full
  pipe).
- ``prepare_all`` opens every worker's files, all or none. Reading back (stderr tail, error file) never raises.

Imports only ``config``, ``errors`` and ``logtree`` from the package.
"""

from __future__ import annotations

import enum
import json
import os
import string
import subprocess
import sys
import threading
from contextlib import ExitStack
from typing import IO

from . import logtree
from ..config import STD_ERR, STD_OUT, WorkerConfig
from ..errors import ConfigError

STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"
ERROR_FILE = "error.json"
PREFIX_TEMPLATE_ENV = "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"  # read from the agent's environment, as torchrun does
TAIL_LINES = 20
_TAIL_BYTES = 64 * 1024
_CHUNK = 64 * 1024
_STREAMS = ("stdout", "stderr")
_CONSOLE_LOCK = threading.Lock()
_FILTERED_LOCK = threading.Lock()


class Dest(enum.Enum):
    """Where one stream of one worker goes."""

    FILE = "file"  # its log file only
    TEE = "tee"  # its log file, and the console line by line after the header
    CONSOLE = "console"  # the console, as written (stderr also to its log file)
    NULL = "null"  # /dev/null (stderr still to its log file)


def route(redirect: int, tee: int, shown: bool) -> tuple[Dest, Dest]:
    """``(stdout, stderr)`` of one local rank from its --redirects and --tee Std values (torchrun's reify). Pure.

    ``shown``: the rank passes ``--local-ranks-filter`` (no filter shows every rank).
    """
    redirect |= tee
    dests = []
    for bit in (STD_OUT, STD_ERR):
        if tee & bit:
            dests.append(Dest.TEE if shown else Dest.FILE)
        elif redirect & bit:
            dests.append(Dest.FILE)
        else:
            dests.append(Dest.CONSOLE if shown else Dest.NULL)
    return dests[0], dests[1]


def line_prefix(role: str, local_rank: int, rank: int, template: str | None = None) -> str:
    """torchrun's console header of one worker: ``[trainer0]:``, or the template with its macros substituted."""
    if template:
        return string.Template(template).safe_substitute(role_name=role, rank=rank, local_rank=local_rank)
    return f"[{role}{local_rank}]:"


def rank_parts(run_id: str, node_id: str, round_: int, rank: int, job: int = 1) -> list[str]:
    """The directories, below ``--log-dir``, of one worker's files for one round of one job of the run (the only
    place this layout is spelled out): a re-run of a finished run id is a new job and never overwrites the earlier
    job's files."""
    return [run_id, f"job_{job:04d}"] + ([node_id] if node_id else []) + [f"round_{round_:04d}", f"rank_{rank}"]


def plan_logs(cfg: WorkerConfig, log_dir: str, run_id: str, node_id: str, round_: int, rank_offset: int,
              template: str | None, job: int = 1) -> list[WorkerLogs]:
    """One ``WorkerLogs`` per local rank, routed by ``cfg`` as torchrun would; nothing is opened yet."""
    shown = cfg.local_ranks_filter
    filters = {"stdout": cfg.duplicate_stdout_filters, "stderr": cfg.duplicate_stderr_filters}
    out = []
    for local_rank in range(cfg.nproc):
        rank = rank_offset + local_rank
        stdout, stderr = route(cfg.redirects.for_rank(local_rank), cfg.tee.for_rank(local_rank),
                               not shown or local_rank in shown)  # an empty filter shows all, as in torchrun
        out.append(WorkerLogs(log_dir, rank_parts(run_id, node_id, round_, rank, job), rank, stdout, stderr,
                              line_prefix(cfg.role, local_rank, rank, template), filters))
    return out


def prepare_all(logs: list[WorkerLogs]) -> list[dict]:
    """Prepare every worker's directory and files, all or none: on failure close what was opened, raise ConfigError
    (naming the path: one that cannot be written, or one that is not the agent's, see ``logtree``)."""
    streams: list[dict] = []
    for item in logs:
        try:
            streams.append(item.prepare())
        except (OSError, ConfigError) as exc:
            for opened in logs:
                opened.close()
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"--log-dir: cannot write worker logs under {item.directory}: {exc}") from exc
    return streams


class WorkerLogs:
    """One worker's log files and the pump threads that copy the streams passing through the agent."""

    def __init__(self, root: str, parts: list[str], rank: int, stdout: Dest = Dest.FILE, stderr: Dest = Dest.FILE,
                 prefix: str = "", filters: dict[str, tuple[str, ...]] | None = None):
        """``root``: --log-dir; ``parts``: the directories below it (``rank_parts``)."""
        self.root = root
        self.parts = list(parts)
        self.directory = os.path.join(root, *parts)
        self.rank = rank
        self.dests = {"stdout": stdout, "stderr": stderr}
        self.prefix = prefix
        self.filters = {name: tuple((filters or {}).get(name, ())) for name in _STREAMS}
        self.stdout_path = os.path.join(self.directory, STDOUT_LOG)
        self.stderr_path = os.path.join(self.directory, STDERR_LOG)
        self.error_file = os.path.join(self.directory, ERROR_FILE)
        self._files: dict[str, IO[bytes]] = {}  # our copies until attach(); then the pumps own theirs
        self._filtered: dict[str, IO[bytes]] = {}
        self._threads: list[threading.Thread] = []

    def filtered_path(self, name: str) -> str:
        return os.path.join(os.path.dirname(self.directory), f"filtered_{name}.log")

    def prepare(self) -> dict:
        """Create the directory, drop a stale error file, open the logs; returns the Popen stdout/stderr kwargs.
        Everything is made or opened relative to the round's directory descriptor (``logtree``)."""
        self._files, self._filtered = {}, {}
        with logtree.opened(self.root, self.parts[:-1]) as round_fd:
            fd = logtree.subdir(round_fd, self.parts[-1], self.directory)
            try:
                self._open(fd, round_fd)
            finally:
                os.close(fd)
        return {name: self._popen_arg(name) for name in _STREAMS}

    def _open(self, fd: int, round_fd: int) -> None:
        logtree.unlink(fd, ERROR_FILE)
        for name, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            dest = self.dests[name]
            if name == "stderr" or dest in (Dest.FILE, Dest.TEE):
                self._files[name] = logtree.open_append(fd, os.path.basename(path), path)
            if self.filters[name]:
                path = self.filtered_path(name)
                filtered = logtree.open_append(round_fd, os.path.basename(path), path)  # created in any case
                if dest is Dest.TEE:
                    self._filtered[name] = filtered
                else:
                    filtered.close()

    def _popen_arg(self, name: str):
        dest = self.dests[name]
        if dest is Dest.TEE or (name == "stderr" and dest is Dest.CONSOLE):
            return subprocess.PIPE
        if name == "stdout" and dest is Dest.CONSOLE:
            return None  # inherited: the worker writes to the agent's stdout itself
        if name == "stdout" and dest is Dest.NULL:
            return subprocess.DEVNULL
        return self._files[name]

    def attach(self, proc: subprocess.Popen) -> None:
        """After a successful spawn: start a pump per piped stream, close the agent's copies of the other files."""
        for name, src in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            if src is None:
                continue
            dst = self._files.pop(name)
            if self.dests[name] is Dest.TEE:
                target, args = _pump_lines, (src, dst, name, self.prefix.encode(), self._filtered.pop(name, None),
                                             self.filters[name])
            else:
                target, args = _pump_raw, (src, dst, name)
            t = threading.Thread(target=target, args=args, daemon=True,
                                 name=f"etcd-agent-workers-pump-rank{self.rank}-{name}")
            t.start()
            self._threads.append(t)
        self.close()

    def spawn_failed(self, message: str) -> None:
        """The worker never ran: leave the reason in its stderr log so reports and operators find it."""
        if "stderr" in self._files:
            _write_file(self._files["stderr"], message.encode() + b"\n")
        self.close()

    def close(self) -> None:
        for f in [*self._files.values(), *self._filtered.values()]:
            f.close()
        self._files, self._filtered = {}, {}

    def join(self, timeout: float) -> bool:
        """Wait (bounded) until the pumps saw end of file; True when none is left running."""
        for t in self._threads:
            t.join(timeout)
        return not any(t.is_alive() for t in self._threads)

    def stderr_tail(self, lines: int = TAIL_LINES) -> str:
        return read_tail(self.stderr_path, lines)


def _pump_lines(src: IO[bytes], dst: IO[bytes], console: str, prefix: bytes, filtered: IO[bytes] | None,
                filters: tuple[str, ...]) -> None:
    """A teed stream: each line to the log file, to the console after the header, and maybe to the filtered log."""
    with ExitStack() as stack:
        for f in (src, dst, filtered):
            if f is not None:
                stack.enter_context(f)
        for line in iter(src.readline, b""):
            _write_file(dst, line)
            shown = prefix + (line if line.endswith(b"\n") else line + b"\n")
            _to_console(console, shown)
            if filtered is not None:
                text = line.decode("utf-8", errors="replace")
                if any(needle in text for needle in filters):
                    with _FILTERED_LOCK:  # one file for the whole round: whole lines only
                        _write_file(filtered, shown)


def _pump_raw(src: IO[bytes], dst: IO[bytes], console: str) -> None:
    """A console stream that we also log: every chunk as read, to the log file and then the console."""
    fd = src.fileno()
    with src, dst:
        while chunk := os.read(fd, _CHUNK):  # not src.read: the buffered reader would wait for 64 KiB
            _write_file(dst, chunk)
            _to_console(console, chunk)


def _write_file(f: IO[bytes], data: bytes) -> None:
    try:
        f.write(data)
    except (OSError, ValueError):  # disk full, file gone: keep draining the pipe, the console still gets it
        pass


def _to_console(name: str, data: bytes) -> None:
    """One write of ``data`` to the agent's sys.stdout or sys.stderr (looked up per call: it may be replaced)."""
    stream = getattr(sys, name, None)
    if stream is None or not data:
        return
    with _CONSOLE_LOCK:
        try:
            buffer = getattr(stream, "buffer", None)
            if buffer is not None:
                stream.flush()  # text written before ours comes first
                buffer.write(data)
                buffer.flush()
            else:
                stream.write(data.decode("utf-8", errors="replace"))
                stream.flush()
        except (OSError, ValueError):  # console closed or gone: the log file still has it
            pass


def read_tail(path: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file, or "" when it is missing or unreadable."""
    try:
        with logtree.open_read(path) as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


def read_error_message(path: str) -> tuple[str | None, str | None]:
    """``(message, problem)`` from a torch ``@record`` error file; both None when there is no file.

    Accepts ``{"message": {"message": "...", "extraInfo": {...}}}`` and ``{"message": "..."}``. A file that
    cannot be read or parsed gives ``(None, "<what is wrong>")`` instead of raising.
    """
    try:
        with logtree.open_read(path) as f:  # the worker's file: never through a symlink
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"the error file {path} could not be read ({exc})"
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, f"the error file {path} is not valid JSON ({exc})"
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, dict):
        message = message.get("message")
    if not isinstance(message, str):
        return None, f"the error file {path} has no message in torch's format"
    return message, None
