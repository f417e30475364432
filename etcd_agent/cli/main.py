"""Command line: torchrun-compatible flags -> AgentConfig -> Agent -> exit code; plus ``status``, ``stop``,
``events``, ``exporter`` (Prometheus metrics) and ``doctor`` (a launch's command line checked on this node, nothing
started).

Exit codes: 0 the job succeeded, 1 the job failed or was stopped (an agent that arrives while the run's ended job
still has registered nodes gets that job's code and message), 2 bad usage (flags, spec mismatch, an etcd host name
that cannot resolve, unreachable etcd at start), 128+N when the agent itself was ended by signal N. Every error is
one line naming the flag, key or file; never a traceback. A command that prints (``status``, ``stop``, ``events``,
``doctor``) whose stdout's reader has gone (``etcd-agent events ... | head -1``) stops quietly with exit 0.

Imports ``cli/``, the base modules, and lazily the agent, ``ops.status``, ``cli.job_etcd`` and ``cli.doctor``; never
``torch/``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from .. import __version__, logs
from . import flags, hostnames, usage
from ..errors import EXIT_OK, AgentError, ConfigError, JobEnded
from .launch import etcd_config, resolve

log = logs.get("etcd_agent.cli.main")
SUBCOMMANDS = tuple(usage.SUBCOMMANDS)  # status, stop, events, exporter: with the etcd flags (ops.status)
DOCTOR = "doctor"  # with a launch's flags (cli.doctor)
PRINTING = (*SUBCOMMANDS, DOCTOR)  # the commands whose answer is their stdout
_ran: logs.Where | None = None  # the agent this command ran: its run and node stamp the last line too


def build_parser() -> argparse.ArgumentParser:
    """torchrun's whole command line plus etcd-agent's own flags (see ``flags``)."""
    return flags.build_parser(__version__)


def run_subcommand(name: str, argv: list[str]) -> int:
    """``etcd-agent status|stop|events|exporter``: its flags, the etcd they name (every host name checked), then
    ``ops.status``."""
    from ..ops.status import run_subcommand as run

    parser = flags.subcommand_parser(name)
    ns = parser.parse_args(argv)
    _setup_logging(ns.log_level, ns.log_format)
    if not ns.run_id and name not in ("status", "exporter", "quarantine"):
        raise ConfigError("--run-id is required")
    flag = flags.sources(parser, ns).get("endpoints", "--etcd-endpoints")
    cfg = etcd_config(ns, ns.endpoints, flag)
    for note in hostnames.check(cfg.endpoints, flag, cfg.connect_timeout):
        log.warning("%s", note)
    if name == "quarantine":
        from ..ops.status import with_etcd
        from .quarantine import run_quarantine
        return with_etcd(cfg, flag, lambda etcd: run_quarantine(ns, etcd))
    return run(name, ns, cfg, flag)


def _setup_logging(level: str, fmt: str = "text") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ConfigError(f"--log-level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    logs.configure(numeric, sys.stderr, fmt, name="")  # every logger: a library's warning looks like ours


def _started(agent, etcd: str) -> None:
    """The agent's one start-up line: its version, the date (every other line says only the time of day), what it
    runs, where etcd is and where the worker logs go."""
    from ..node.env import log_root

    cfg, now = agent.cfg, time.localtime()
    nnodes = f"{cfg.spec.min_nodes}" + (f":{cfg.spec.max_nodes}" if cfg.spec.max_nodes != cfg.spec.min_nodes else "")
    nproc, logs_in = cfg.workers.nproc, log_root(cfg.workers)
    log.bound(agent.where).info(
        "etcd-agent %s on %s (UTC%s): nnodes %s, %d worker%s per node, %s, worker logs in %s", __version__,
        time.strftime("%Y-%m-%d", now), time.strftime("%z", now), nnodes, nproc, "" if nproc == 1 else "s", etcd,
        logs_in, event="agent_started", fields={"version": __version__, "nnodes": nnodes, "nproc": nproc,
                                                "etcd": etcd, "log_dir": logs_in})


def run_agent(argv: list[str]) -> int:
    global _ran
    from ..agent import Agent, install_signal_handlers
    from ..etcd.waits import quiet_grpc_waits
    from .job_etcd import JobEtcd

    parser = build_parser()
    ns = parser.parse_args(argv)
    _setup_logging(ns.log_level, ns.log_format)
    launch = resolve(parser, ns)  # every flag and the entrypoint checked before etcd starts
    notes = list(launch.notes)
    if not launch.embedded and launch.serve is None:  # a served etcd's host was resolved by resolve's checks
        notes += hostnames.check(launch.cfg.etcd.endpoints, launch.etcd_flag, launch.cfg.etcd.connect_timeout)
    for note in notes:
        log.warning("%s", note)
    from .. import metrics  # after the flags: --help never loads it; prometheus_client only with --metrics-port

    c = launch.cfg  # a port in use, or no prometheus-client, is an error before etcd is touched
    served = metrics.start(c.metrics_port, c.local_addr, c.run_id, c.node_id)
    job_etcd, agent = JobEtcd(launch.embedded, launch.serve), None
    quiet_grpc_waits()  # the agent's own process: its gRPC waits sleep, not poll (never torchrun's or a worker's)
    try:
        cfg = job_etcd.start(launch.cfg)  # a one-node job's embedded etcd, or the one a c10d line's endpoint names
        agent = Agent(cfg, __version__)
        _ran = agent.where
        _started(agent, job_etcd.describe(cfg))
        if served:
            log.bound(agent.where).info("serving this agent's Prometheus metrics at %s", served)
        install_signal_handlers(agent, cfg.signals)
        try:
            return agent.run()
        except JobEnded as exc:  # the run's job ended and some of its nodes are still registered: its end is ours
            if exc.exit_code != EXIT_OK:
                raise
            log.info("%s; this agent started nothing", exc)
            return EXIT_OK
        except AgentError as exc:
            if agent.signalled:
                _error(str(exc), 128 + agent.signalled)
                return 128 + agent.signalled
            raise
    finally:
        job_etcd.stop(agent.keys if agent is not None else None)  # a served etcd: after the other agents left
        metrics.stop()


def _error(msg: str, code: int) -> None:
    """The command's last line: ``etcd-agent: error: ...``, or with ``--log-format json`` a JSON line (event
    ``exit``)."""
    if logs.structured():
        log.bound(_ran).error("%s", msg, event="exit", fields={"exit_code": code})
        return
    print(f"etcd-agent: error: {msg}", file=sys.stderr, flush=True)


def _unexpected(exc: Exception, command: str) -> int:
    """A bug still ends in one clear line; the traceback goes to DEBUG, which every command's --log-level shows."""
    log.debug("unexpected error", exc_info=True)
    again = f"etcd-agent {command}" if command else "etcd-agent"
    _error(f"unexpected {type(exc).__name__}: {exc} (run {again} again with --log-level DEBUG for the traceback)", 1)
    return 1


def _stdout_gone() -> int:
    """stdout's reader left (``| head -1``): the answer is no longer wanted. stdout is pointed at /dev/null so that
    the interpreter's last flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (replaced in-process): nothing to flush
        pass
    return EXIT_OK


def _run_printing(command: str, argv: list[str]) -> int:
    if command == DOCTOR:
        from .doctor import run_doctor

        code = run_doctor(argv, _setup_logging)
    else:
        code = run_subcommand(command, argv)
    sys.stdout.flush()  # here, not at exit: a reader that left is seen as the BrokenPipeError main() handles
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in PRINTING else ""
    try:
        return _run_printing(command, argv[1:]) if command else run_agent(argv)
    except BrokenPipeError as exc:
        return _stdout_gone() if command else _unexpected(exc, command)
    except AgentError as exc:
        _error(str(exc), exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        _error("interrupted", 130)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug must still end in one clear line; the traceback goes to DEBUG
        return _unexpected(exc, command)
