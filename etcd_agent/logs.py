"""One log format for every etcd-agent line, as text (``12:01:02.345 I [a1b2c3d4 node-1 r2] message``) or as one JSON
object per line (``--log-format json``).

Every module logs through ``get(name)``, a logger adapter that puts the run, node and round in front of the
message: the agent's own ``Where`` when a line is about that agent (the agent, its coordinator and its worker
group are given it), else the one agent this process runs (on the command line and under torchrun there is
exactly one; a simulation that runs many agents in one process stamps only the lines that name their agent).
``round=K`` on a call says the line is about round K (a worker of the round before, exiting): the default is the
round the agent is in; round 0 (before any round) is left out. The stamp is in the message itself, so every
handler shows it, an application's own too; the JSON format takes it out again and gives run, node and round as
fields. ``event=NAME`` marks a line that records a change (``state``, ``round_joined``, ``job_ended``, ...) and
``fields={...}`` adds what a program reading the JSON needs about it; the text format shows neither.

Messages start lower-case and end without a period (tests/test_logs.py checks every logging call of the package).
``configure`` installs the one stderr handler and format. Imports nothing from the package.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import threading
import time

FORMAT = "%(asctime)s %(letter)s %(message)s"  # the text format; the time is HH:MM:SS.mmm, the level one letter
FORMATS = ("text", "json")  # --log-format


@dataclasses.dataclass(frozen=True)
class Stamp:
    """What a line's stamp said, for the JSON format: the stamp's text is ``prefix``."""
    run: str
    node: str
    round: int
    prefix: str
    event: str = ""
    fields: dict | None = None


class Where:
    """Run, node and the round an agent is in; the agent moves ``round`` on as it sees new rounds."""

    def __init__(self, run: str, node: str):
        self.run, self.node, self.round = run, node, 0

    def stamp(self, rnd: int | None = None) -> str:
        rnd = self.round if rnd is None else rnd
        return f"[{self.run} {self.node}{f' r{rnd}' if rnd else ''}] "


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
    """A logger whose lines carry run, node and round (``Where``), and, where given, an event and its fields."""

    def __init__(self, logger: logging.Logger, where: Where | None = None):
        super().__init__(logger, {})
        self.where = where

    def process(self, msg, kwargs):
        rnd, event, fields = kwargs.pop("round", None), kwargs.pop("event", ""), kwargs.pop("fields", None)
        where = self.where or _the_agent()
        if where is not None:
            prefix = where.stamp(rnd)  # run and node ids have no "%" (config checks them)
            msg = prefix + str(msg)
            stamp = Stamp(where.run, where.node, where.round if rnd is None else rnd, prefix, event, fields)
        else:
            stamp = Stamp("", "", 0, "", event, fields)
        kwargs["extra"] = {**kwargs.get("extra", {}), "etcd_agent": stamp}
        return msg, kwargs

    def bound(self, where: Where | None) -> Log:
        """This logger, stamping ``where``'s run, node and round."""
        return Log(self.logger, where)


def get(name: str, where: Where | None = None) -> Log:
    return Log(logging.getLogger(name), where)


class TextFormatter(logging.Formatter):
    """``FORMAT``: the time of day to the millisecond (a start-up line says the date), the level's first letter."""

    def __init__(self):
        super().__init__(FORMAT)

    def formatTime(self, record, datefmt=None):  # noqa: N802 - logging's name
        return time.strftime("%H:%M:%S", self.converter(record.created)) + f".{int(record.msecs):03d}"

    def formatMessage(self, record):  # noqa: N802 - logging's name
        return FORMAT % {**record.__dict__, "letter": record.levelname[:1]}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, ms, local offset), level, logger, run, node and round when known,
    event when the line has one, message (without the stamp), the event's fields, the exception's traceback."""

    def format(self, record):
        stamp: Stamp | None = getattr(record, "etcd_agent", None)
        message = record.getMessage()
        wall = datetime.datetime.fromtimestamp(record.created).astimezone()
        out = {"time": wall.isoformat(timespec="milliseconds"), "level": record.levelname, "logger": record.name}
        if stamp is not None:
            message = message.removeprefix(stamp.prefix)
            out.update({k: v for k, v in (("run", stamp.run), ("node", stamp.node), ("round", stamp.round),
                                          ("event", stamp.event)) if v})
        out["message"] = message
        if stamp is not None and stamp.fields:
            out.update({k: v for k, v in stamp.fields.items() if k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


_format = "text"  # what ``configure`` was last told


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def structured() -> bool:
    """Whether the lines are JSON (``--log-format json``): then a command's last error line is JSON too."""
    return _format == "json"


def configure(level: int, stream, fmt: str = "text", name: str = "etcd_agent") -> None:
    """The stderr handler in the one format: for the ``etcd_agent`` loggers (torchrun, when the application set up
    no logging of its own), or with ``name=""`` for every logger (the command line), unless that logger has a
    handler already (as ``logging.basicConfig``)."""
    global _format
    _format = fmt
    logger = logging.getLogger(name or None)
    if logger.handlers:
        return
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(level)
    if name:
        logger.propagate = False
