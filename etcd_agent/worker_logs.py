"""Where a worker's output goes: log files per round and rank, the optional console tee, the error file.

Layout, one directory per worker and round::

    <log_dir>/<run_id>/<node_id>/round_<round:04d>/rank_<global rank>/{stdout.log, stderr.log, error.json}

(``<node_id>/`` is left out when the node id is empty.) Files are opened for appending; a stale error file is
deleted before each start.

Without tee the child writes straight into the files (no pipe, nothing in the agent can stall it). With tee, one
reader thread per stream copies each line to the file and to the agent's console prefixed ``[rank N]: ``; a
console line is written with one call under a lock, so lines of different workers never mix. Reading back (stderr
tail, error file message) never raises. Imports only ``errors`` from the package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import IO

from .errors import ConfigError

STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"
ERROR_FILE = "error.json"
TAIL_LINES = 20
_TAIL_BYTES = 64 * 1024
_CONSOLE_LOCK = threading.Lock()


def rank_dir(log_dir: str, run_id: str, node_id: str, round_: int, rank: int) -> str:
    """The directory of one worker's files for one round (the only place this layout is spelled out)."""
    parts = [log_dir, run_id] + ([node_id] if node_id else []) + [f"round_{round_:04d}", f"rank_{rank}"]
    return os.path.join(*parts)


def prepare_all(logs: list[WorkerLogs]) -> list[dict]:
    """Prepare every worker's directory and files, all or none: on failure close what was opened, raise ConfigError."""
    streams: list[dict] = []
    for item in logs:
        try:
            streams.append(item.prepare())
        except OSError as exc:
            for opened in logs:
                opened.close()
            raise ConfigError(f"--log-dir: cannot write worker logs under {item.directory}: {exc}") from exc
    return streams


class WorkerLogs:
    """One worker's log files and, with tee, the two threads that copy its output."""

    def __init__(self, directory: str, rank: int, tee: bool):
        self.directory = directory
        self.rank = rank
        self.tee = tee
        self.stdout_path = os.path.join(directory, STDOUT_LOG)
        self.stderr_path = os.path.join(directory, STDERR_LOG)
        self.error_file = os.path.join(directory, ERROR_FILE)
        self._files: list[IO[bytes]] = []
        self._threads: list[threading.Thread] = []

    def prepare(self) -> dict:
        """Create the directory, drop a stale error file, open the logs; returns the Popen stdout/stderr kwargs."""
        os.makedirs(self.directory, exist_ok=True)
        try:
            os.unlink(self.error_file)
        except FileNotFoundError:
            pass
        self._files = []
        for path in (self.stdout_path, self.stderr_path):
            self._files.append(open(path, "ab"))  # noqa: SIM115 - closed by close() or the tee threads
        if self.tee:
            return {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        return {"stdout": self._files[0], "stderr": self._files[1]}

    def attach(self, proc: subprocess.Popen) -> None:
        """After a successful spawn: start the tee threads, or close the agent's copies of the files."""
        if not self.tee:
            self.close()
            return
        prefix = f"[rank {self.rank}]: ".encode()
        for src, dst, console in ((proc.stdout, self._files[0], "stdout"), (proc.stderr, self._files[1], "stderr")):
            t = threading.Thread(target=_pump, args=(src, dst, console, prefix), daemon=True,
                                 name=f"etcd-agent-workers-tee-rank{self.rank}-{console}")
            t.start()
            self._threads.append(t)
        self._files = []  # the threads own and close them now

    def spawn_failed(self, message: str) -> None:
        """The worker never ran: leave the reason in its stderr log so reports and operators find it."""
        if self._files:
            self._files[1].write(message.encode() + b"\n")
        self.close()

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def join(self, timeout: float) -> bool:
        """Wait (bounded) until the tee threads saw end of file; True when none is left running."""
        for t in self._threads:
            t.join(timeout)
        return not any(t.is_alive() for t in self._threads)

    def stderr_tail(self, lines: int = TAIL_LINES) -> str:
        return read_tail(self.stderr_path, lines)


def _pump(src: IO[bytes], dst: IO[bytes], console: str, prefix: bytes) -> None:
    """Copy lines from a worker pipe to its log file and the agent's console until end of file."""
    with src, dst:
        for line in iter(src.readline, b""):
            dst.write(line)
            dst.flush()
            _to_console(console, prefix + (line if line.endswith(b"\n") else line + b"\n"))


def _to_console(name: str, data: bytes) -> None:
    stream = getattr(sys, name, None)  # looked up per line: the agent (or a test) may replace it
    if stream is None:
        return
    text = data.decode("utf-8", errors="replace")
    with _CONSOLE_LOCK:
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # console closed or gone: the log file still has the line
            pass


def read_tail(path: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file, or "" when it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
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
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
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
