"""Worker progress heartbeats for hang detection (``--worker-timeout``); no torch, no etcd, stdlib only.

A worker proves progress by calling ``beat()`` (or by touching the file named in ``$ETCD_AGENT_PROGRESS_FILE``
itself, from any language). The agent compares each file's modification time with ``--worker-timeout``: a
worker that has neither beaten nor started within that many seconds is hung, and its agent restarts the group
as for a failure. Importing this module is cheap and safe from workers: it imports nothing of the package.

    from etcd_agent.progress import beat
    for step, batch in enumerate(loader):
        train_step(batch)
        beat()
"""

from __future__ import annotations

import os
import time

PROGRESS_ENV = "ETCD_AGENT_PROGRESS_FILE"
_MIN_INTERVAL = 0.5  # beats closer than this are free: one file touch per half second at most
_last = 0.0


def beat() -> None:
    """Record that this worker made progress. Cheap enough to call every step; a no-op outside etcd-agent."""
    global _last
    path = os.environ.get(PROGRESS_ENV)
    now = time.monotonic()
    if not path or now - _last < _MIN_INTERVAL:
        return
    _last = now
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
