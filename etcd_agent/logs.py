"""One log format for every etcd-agent line: ``TIME LEVEL etcd-agent: [run R node N round K] message``.

Every module logs through ``get(name)``, a logger adapter that puts the run, node and round in front of the
message: the agent's own ``Where`` when a line is about that agent (the agent, its coordinator and its worker
group are given it), else the one agent this process runs (on the command line and under torchrun there is
exactly one; a simulation that runs many agents in one process stamps only the lines that name their agent).
``round=K`` on a call says the line is about round K (a worker of the round before, exiting): the default is the
round the agent is in. The stamp is in the message itself, so every handler shows it, an application's own too.
``configure`` installs the one stderr handler and format. Imports nothing from the package.
"""

from __future__ import annotations

import logging
import threading

FORMAT = "%(asctime)s %(levelname)s etcd-agent: %(message)s"


class Where:
    """Run, node and the round an agent is in; the agent moves ``round`` on as it sees new rounds."""

    def __init__(self, run: str, node: str):
        self.run, self.node, self.round = run, node, 0

    def stamp(self, rnd: int | None = None) -> str:
        rnd = self.round if rnd is None else rnd
        return f"[run {self.run} node {self.node} round {rnd or '-'}] "


_lock = threading.Lock()
_agents: list[Where] = []  # the agents running in this process


def running(where: Where) -> None:
    """``where``'s agent runs in this process now (until ``stopped``)."""
    with _lock:
        _agents.append(where)


def stopped(where: Where) -> None:
    with _lock:
        if where in _agents:
            _agents.remove(where)


def _the_agent() -> Where | None:
    with _lock:
        return _agents[0] if len(_agents) == 1 else None


class Log(logging.LoggerAdapter):
    """A logger whose lines carry run, node and round (``Where``)."""

    def __init__(self, logger: logging.Logger, where: Where | None = None):
        super().__init__(logger, {})
        self.where = where

    def process(self, msg, kwargs):
        rnd = kwargs.pop("round", None)
        where = self.where or _the_agent()
        if where is not None:
            msg = where.stamp(rnd) + str(msg)  # run and node ids have no "%" (config checks them)
        return msg, kwargs

    def bound(self, where: Where | None) -> Log:
        """This logger, stamping ``where``'s run, node and round."""
        return Log(self.logger, where)


def get(name: str, where: Where | None = None) -> Log:
    return Log(logging.getLogger(name), where)


def configure(level: int, stream) -> None:
    """The agent's stderr handler in the one format (the command line, and torchrun when the application set up
    no logging of its own)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger("etcd_agent")
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
