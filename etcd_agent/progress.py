"""Worker progress heartbeats and training steps (``--worker-timeout``, the progress in etcd); stdlib only.

A worker proves progress by calling ``beat()`` (or ``beat(step)``), or by writing the file named in
``$ETCD_AGENT_PROGRESS_FILE`` itself, from any language. The file's modification time is the last beat: a worker
that has neither beaten nor started within ``--worker-timeout`` seconds is hung, and its agent restarts the group as
for a failure. The file's content is the training step as decimal text (``1200``, a trailing newline allowed); an
empty file is a beat without a step, as before steps existed. The agent publishes its node's latest step and step
rate in etcd (``P/progress/<node>``) and the no-progress guard (``--max-no-progress-restarts``) reads them; a
file it cannot read as a step is ignored, with one warning per file. Importing this module is cheap and safe from
workers: it imports nothing of the package.

    from etcd_agent.progress import beat
    for step, batch in enumerate(loader, start=1):
        train_step(batch)
        beat(step)

Cost: at most one file write per half second, whatever the step rate (a beat inside that interval returns at
once); a step written with a beat replaces the file atomically (a temporary file renamed over it), so a reader
never sees half a number. The step the file shows thus lags the newest by at most half a second of steps.
"""

from __future__ import annotations

import os
import time

PROGRESS_ENV = "ETCD_AGENT_PROGRESS_FILE"
_MIN_INTERVAL = 0.5  # beats closer than this are free: one file write per half second at most
MAX_STEP_TEXT = 32  # bytes read of a progress file: a step is a decimal number, far shorter
_last = 0.0


def beat(step: int | None = None) -> None:
    """Record that this worker made progress, and with ``step`` (a whole number >= 0) the training step it reached.
    Cheap enough to call every step; a no-op outside etcd-agent. ValueError for a step that is not a whole number
    >= 0 (a mistake in the caller: raised even outside etcd-agent, so it is found early)."""
    global _last
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"beat(step): the step is a whole number >= 0, not {step!r}")
    path = os.environ.get(PROGRESS_ENV)
    now = time.monotonic()
    if not path or now - _last < _MIN_INTERVAL:
        return
    _last = now
    if step is not None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{step}\n")
        os.replace(tmp, path)
        return
    try:
        os.utime(path)
    except FileNotFoundError:
        with open(path, "a"):
            pass


def last_progress(path: str, started: float) -> float:
    """Wall time of the worker's last beat, or of its start when it never beat."""
    try:
        return max(started, os.stat(path).st_mtime)
    except OSError:
        return started


def read_step(path: str) -> int | None:
    """The step a progress file holds: None when there is no file or it is empty (beats without a step).
    ValueError when its content is not a decimal whole number (the caller warns once and ignores it)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STEP_TEXT + 1)
    except OSError:
        return None
    text = raw.strip()
    if not text:
        return None
    if len(raw) > MAX_STEP_TEXT or not text.isdigit():
        shown = text[:MAX_STEP_TEXT].decode("utf-8", "replace")
        raise ValueError(f"progress file {path} holds {shown!r}, not a step (a decimal whole number)")
    return int(text)
