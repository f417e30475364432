"""Handing one round's worker to a warm spare (``--warm-restart``, ``warm.py``): the spare gets the worker's
environment, its command line and the round's stdout/stderr, as the same files and pipes a cold spawn gets.

Guarantees: a handoff that fails leaves nothing open here (its pipes are closed) and the spare killed, so the worker
starts cold; the descriptors passed to the spare are closed here once it has them. A spare still importing
``--preload`` when it was handed the worker says within ``cold_after`` (plus a margin) whether it finished in time;
``say_how_it_started`` warns, once, when it had to start the worker cold or said nothing.

Imports ``config``, ``logs`` and ``node.warm`` only; never ``etcd/``, ``coord/`` or the agent.
"""

from __future__ import annotations

import os
import subprocess
from typing import IO

from ..config import WorkerConfig
from ..logs import Log
from .warm import Spare

WORD_MARGIN = 10.0  # beyond cold_after: how long a waiter waits for a spare's word before it warns


def hand(spare: Spare, cfg: WorkerConfig, env: dict[str, str], streams: dict, cold_after: float) -> dict[str, IO]:
    """Give ``spare`` the worker: ``streams`` are the Popen keyword arguments a cold spawn would get. Returns the
    read ends of the pipes made for it (``stdout``/``stderr``); OSError when the spare could not take it (it is
    killed then)."""
    fds, ours, readers = [], [], {}
    for name, inherited in (("stdout", 1), ("stderr", 2)):
        arg = streams[name]
        if arg is None:
            fds.append(inherited)  # the agent's own stream, as a cold worker inherits it
        elif arg == subprocess.PIPE:
            r, wr = os.pipe()
            readers[name] = open(r, "rb")  # noqa: SIM115 - the pump owns it, as Popen's own pipe
            fds.append(wr)
            ours.append(wr)
        elif arg == subprocess.DEVNULL:
            fd = os.open(os.devnull, os.O_WRONLY)
            fds.append(fd)
            ours.append(fd)
        else:
            fds.append(arg.fileno())
    msg = {"entrypoint": cfg.entrypoint, "module": cfg.module, "args": list(cfg.args), "orig_argv": cfg.command(),
           "env": env, "cold_after": cold_after}
    try:
        spare.hand(msg, fds)
    except OSError:
        spare.kill()
        for f in readers.values():
            f.close()
        raise
    finally:
        for fd in ours:
            os.close(fd)
    return readers


def say_how_it_started(spare: Spare, cold_after: float, log: Log, rank: int, pid: int, rnd: int) -> None:
    """A worker handed to a spare still importing: say so once when the spare had to start it cold."""
    word = spare.word(cold_after + WORD_MARGIN)
    if word is None:
        log.warning("the warm spare of worker rank %d (pid %d) has neither finished importing --preload nor started "
                    "the worker cold %.0f s after its handoff; the worker has not started", rank, pid,
                    cold_after + WORD_MARGIN, round=rnd)
    elif word.get("cold"):
        log.warning("the warm spare of worker rank %d (pid %d) %s; it started the worker cold (the same process now "
                    "runs the worker's command line)", rank, pid, word["cold"], round=rnd)
