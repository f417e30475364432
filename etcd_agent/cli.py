"""Command line: torchrun-compatible flags -> AgentConfig -> Agent -> exit code; plus ``status`` and ``stop``.

Exit codes: 0 the job succeeded, 1 the job failed or was stopped, 2 bad usage (flags, spec mismatch, unreachable
etcd at start), 128+N when the agent itself was ended by signal N. Every error is one line naming the flag, key
or file; never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from . import __version__
from .config import (AgentConfig, EtcdConfig, JobSpec, WorkerConfig, default_node_id, parse_endpoints,
                     parse_nnodes, resolve_nproc)
from .errors import AgentError, ConfigError

log = logging.getLogger("etcd_agent.cli")
SUBCOMMANDS = ("status", "stop")
PASSWORD_ENV = "ETCD_AGENT_ETCD_PASSWORD"


def _flag(p: argparse.ArgumentParser, *names: str, **kw) -> None:
    """Add a flag under its dashed name and torchrun's underscored spelling."""
    spelled = list(names) + ["--" + n[2:].replace("-", "_") for n in names if n.startswith("--") and "-" in n[2:]]
    p.add_argument(*spelled, **kw)


def _etcd_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("etcd")
    _flag(g, "--etcd-endpoints", "--rdzv-endpoint", dest="endpoints", default=os.environ.get("ETCD_AGENT_ENDPOINTS"),
          help="etcd client endpoints, HOST:PORT[,HOST:PORT...] (env ETCD_AGENT_ENDPOINTS)")
    _flag(g, "--run-id", "--rdzv-id", dest="run_id", default=os.environ.get("ETCD_AGENT_RUN_ID"),
          help="the job's id, the same on every node (env ETCD_AGENT_RUN_ID)")
    _flag(g, "--etcd-prefix", dest="root", default="/etcd-agent", help="root of all keys (default /etcd-agent)")
    _flag(g, "--etcd-cacert", dest="cacert", help="CA bundle: talk TLS to etcd")
    _flag(g, "--etcd-cert", dest="cert", help="client certificate (mutual TLS)")
    _flag(g, "--etcd-key", dest="key", help="client certificate key (mutual TLS)")
    _flag(g, "--etcd-user", dest="user", help=f"etcd user (TLS only); the password comes from ${PASSWORD_ENV}")
    _flag(g, "--etcd-timeout", dest="etcd_timeout", type=float, default=10.0,
          help="seconds to keep trying to reach etcd at start (default 10)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="etcd-agent", description="Elastic launcher for multi-node PyTorch jobs, coordinated through etcd v3. "
        "Subcommands: 'etcd-agent status ...' and 'etcd-agent stop ...' (see --help of each).")
    _etcd_flags(p)
    j = p.add_argument_group("job")
    _flag(j, "--nnodes", default="1:1", help="MIN:MAX or N nodes (default 1)")
    _flag(j, "--nproc-per-node", dest="nproc", default="1", help="workers per node: N, gpu, cpu or auto (default 1)")
    _flag(j, "--max-restarts", type=int, default=0, help="job-wide restart budget (default 0)")
    _flag(j, "--node-id", help="this node's id (default: host name plus a short unique suffix)")
    _flag(j, "--local-addr", default="", help="address peers reach this node at (default: this host's FQDN address)")
    _flag(j, "--standalone", action="store_true", help="start a private etcd on free loopback ports for a one-node job")
    t = p.add_argument_group("timing")
    _flag(t, "--lease-ttl", type=int, default=5, help="session lease TTL in seconds: a lost node is seen within it (default 5)")
    _flag(t, "--last-call", type=float, default=3.0, help="seconds a round waits for more nodes once MIN joined (default 3)")
    _flag(t, "--join-timeout", type=float, default=600.0, help="seconds to wait for MIN nodes (default 600)")
    _flag(t, "--stop-timeout", type=float, default=10.0, help="grace between SIGTERM and SIGKILL for workers (default 10)")
    _flag(t, "--scale-settle", type=float, default=1.0, help="seconds new nodes are batched before scaling up (default 1)")
    _flag(t, "--worker-timeout", type=float, default=0.0,
          help="restart the job when a worker shows no progress for this many seconds (default 0: off; see "
               "etcd_agent.progress.beat)")
    w = p.add_argument_group("workers")
    _flag(w, "--log-dir", default=None, help="per-round, per-rank logs go here (default: a temporary directory)")
    _flag(w, "--tee", action="store_true", help="also copy worker output to the console, prefixed [rank N]:")
    p.add_argument("-m", "--module", action="store_true", help="run ENTRYPOINT as a Python module (python -m)")
    _flag(w, "--no-python", action="store_true", help="run ENTRYPOINT as a program, not a Python script")
    _flag(p, "--log-level", default=os.environ.get("ETCD_AGENT_LOG_LEVEL", "INFO"), help="agent log level (default INFO)")
    p.add_argument("--version", action="version", version=f"etcd-agent {__version__}")
    p.add_argument("entrypoint", help="training script (or module with -m, or program with --no-python)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the entrypoint")
    return p


def _etcd_config(ns: argparse.Namespace, endpoints: str | None = None) -> EtcdConfig:
    text = endpoints or ns.endpoints
    if not text:
        raise ConfigError("--etcd-endpoints is required (or --standalone for a one-node job)")
    if ns.etcd_timeout <= 0:
        raise ConfigError(f"--etcd-timeout must be positive, got {ns.etcd_timeout}")
    password = os.environ.get(PASSWORD_ENV) if ns.user else None
    if ns.user and ns.cacert is None:
        raise ConfigError("--etcd-user needs TLS (--etcd-cacert): etcd refuses password auth on a plaintext channel")
    # One RPC attempt must leave time for another member before the lease (and the job) could suffer.
    lease_ttl = getattr(ns, "lease_ttl", 5)
    return EtcdConfig(parse_endpoints(text), ns.cacert, ns.cert, ns.key, ns.user, password,
                      request_timeout=max(0.5, min(3.0, lease_ttl / 3)), connect_timeout=ns.etcd_timeout)


def agent_config(ns: argparse.Namespace, endpoints: str | None = None) -> AgentConfig:
    lo, hi = parse_nnodes(ns.nnodes)
    run_id = ns.run_id
    if not run_id:
        raise ConfigError("--run-id is required: the same id on every node of the job")
    workers = WorkerConfig(ns.entrypoint, tuple(ns.args), resolve_nproc(ns.nproc), ns.module, ns.no_python,
                           ns.log_dir or "",  # empty: the worker group makes a temporary directory and logs it
                           ns.tee, ns.stop_timeout)
    return AgentConfig(run_id=run_id, node_id=ns.node_id or default_node_id(),
                       spec=JobSpec(lo, hi, ns.nproc.strip().lower(), ns.max_restarts), workers=workers,
                       etcd=_etcd_config(ns, endpoints), root=ns.root, local_addr=ns.local_addr,
                       lease_ttl=ns.lease_ttl, last_call=ns.last_call, join_timeout=ns.join_timeout,
                       scale_settle=ns.scale_settle, worker_timeout=ns.worker_timeout)


def _setup_logging(level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ConfigError(f"--log-level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=numeric, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s etcd-agent: %(message)s")


def run_agent(argv: list[str]) -> int:
    from .agent import Agent, install_signal_handlers

    ns = build_parser().parse_args(argv)
    _setup_logging(ns.log_level)
    server = None
    try:
        if ns.standalone:
            _check_standalone(ns)
            ns.run_id = ns.run_id or f"standalone-{os.getpid()}"
            ns.local_addr = ns.local_addr or "127.0.0.1"
        cfg = agent_config(ns, "127.0.0.1:2379" if ns.standalone else None)  # every flag checked before etcd starts
        if ns.standalone:
            from .standalone import EtcdServer

            server = EtcdServer(name="etcd-agent-standalone").start()
            cfg = dataclasses.replace(cfg, etcd=dataclasses.replace(cfg.etcd, endpoints=parse_endpoints(server.endpoint)))
            log.info("standalone etcd serving at %s (data in %s, removed on exit)", server.endpoint, server.data_dir)
        log.info("run %s, node %s, %d worker(s), nnodes %d:%d, worker logs under %s", cfg.run_id, cfg.node_id,
                 cfg.workers.nproc, cfg.spec.min_nodes, cfg.spec.max_nodes,
                 cfg.workers.log_dir or "a temporary directory")
        agent = Agent(cfg, __version__)
        install_signal_handlers(agent)
        try:
            return agent.run()
        except AgentError as exc:
            if agent.signalled:
                _error(str(exc))
                return 128 + agent.signalled
            raise
    finally:
        if server is not None:
            server.stop()


def _check_standalone(ns: argparse.Namespace) -> None:
    if ns.endpoints and ns.endpoints != os.environ.get("ETCD_AGENT_ENDPOINTS"):
        raise ConfigError("--standalone starts its own etcd: drop --etcd-endpoints")
    if parse_nnodes(ns.nnodes) != (1, 1):
        raise ConfigError(f"--standalone runs a one-node job; --nnodes {ns.nnodes} needs a shared etcd "
                          "(--etcd-endpoints)")


def _error(msg: str) -> None:
    print(f"etcd-agent: error: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            from .inspect import run_subcommand

            return run_subcommand(argv[0], argv[1:], _etcd_flags, _etcd_config, _setup_logging)
        return run_agent(argv)
    except AgentError as exc:
        _error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug must still end in one clear line; the traceback goes to DEBUG
        log.debug("unexpected error", exc_info=True)
        _error(f"unexpected {type(exc).__name__}: {exc} (run with --log-level DEBUG for the traceback)")
        return 1
