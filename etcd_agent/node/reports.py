"""Failure reports of single workers: what an operator needs about a worker that failed or hung, from its error
file (torch's ``@record``) and the last lines of its stderr.

Guarantees: a report never raises on a missing or malformed file (the message says what was wrong instead); every
text field is redacted (``secure.redact``: a worker may print the etcd password on its way down), so nothing secret
reaches etcd, logs or status. Imports ``secure``, ``schema.values`` and ``node/`` (``api``, ``worker_logs``) only.
"""

from __future__ import annotations

from ..secure import redact
from ..schema.values import Failure
from .api import WorkerExit
from .worker_logs import WorkerLogs, read_error_message

FLUSH_WAIT = 1.0  # how long a report waits for the pump threads to finish writing the stderr log


def evidence(logs: WorkerLogs | None) -> tuple[str, str]:
    """A worker's error file (its path) and the last lines of its stderr."""
    if not logs:
        return "", ""
    logs.join(FLUSH_WAIT)  # let the stderr pump put the last lines in the file
    return logs.error_file, logs.stderr_tail()


def exit_report(logs: WorkerLogs | None, ex: WorkerExit, node: str) -> Failure:
    """The report of a worker that exited non-zero: its error file's message, else what is known and its stderr."""
    error_file, tail = evidence(logs)
    message, problem = read_error_message(error_file) if error_file else (None, None)
    if message is None:
        lead = problem or "no error file was written"
        message = f"{lead}; the worker exited with {ex.describe()}"
        if tail:
            message += "; last lines of its stderr:\n" + tail
    return Failure(ex.rank, ex.local_rank, ex.pid, ex.returncode, ex.signal_name, message, error_file, tail,
                   ex.time, ex.round, node).with_strings(redact)


def hang_report(logs: WorkerLogs | None, rank: int, local_rank: int, pid: int, rnd: int, silent: float, limit: float,
                when: float, node: str) -> Failure:
    """The report of a running worker that made no progress for ``silent`` seconds (``--worker-timeout`` ``limit``)."""
    error_file, tail = evidence(logs)
    message = f"no progress for {silent:.1f} s (--worker-timeout {limit:g}); the worker is considered hung"
    return Failure(rank, local_rank, pid, None, None, message, error_file, tail, when, rnd, node,
                   hang=True).with_strings(redact)
