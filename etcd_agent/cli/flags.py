"""The agent's command line: every flag of torch 2.13's torchrun, with torchrun's spellings, arity, defaults and
``PET_<DEST>`` environment forms, plus etcd-agent's own flags.

Guarantees:

- A torchrun flag parses to the same ``dest`` and the same value as under ``torch.distributed.run``; its
  ``PET_<DEST>`` variable replaces the default exactly as torch's ``env``/``check_env`` actions do (read when the
  parser is built), but a bad value is a ConfigError naming the variable instead of a traceback.
- ``sources(ns)`` tells, for every dest, where its value came from: the option string used on the command line,
  the environment variable, or nothing (the default). Callers use it to refuse contradicting flags with an error
  naming both, instead of letting one silently override the other.

Every default that is etcd-agent's own (timings, timeouts, the quarantine policy) is read from the configuration
records (``config.py``), which state each once; torchrun's flags keep torchrun's defaults.
Imports only ``config``, ``errors`` and (lazily) ``cli.exporter_flags``; never torch.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Callable

from ..config import (DEFAULT_ROOT, MAX_NODES, MAX_NODES_WHY, RECOMMENDED_NO_RESTART_CODE, AgentConfig, EtcdConfig,
                      HealthConfig, QuarantinePolicy, Timings, WorkerConfig)
from ..errors import ConfigError
from .usage import DESCRIPTION, EPILOG, SUBCOMMANDS, USAGE, unrecognized

_SOURCES = "_etcd_agent_sources"  # namespace attribute: dest -> the option string given on the command line
PASSWORD_ENV = "ETCD_AGENT_ETCD_PASSWORD"
NUMA_MODES = ("node", "socket", "exclusive", "core-complex")  # torch.numa.binding.AffinityMode in torch 2.13
START_METHODS = ("spawn", "fork", "forkserver")
LOG_FORMATS = ("text", "json")  # logs.FORMATS


def parse_nnodes(text: str) -> tuple[int, int]:
    """``--nnodes``: ``N`` or ``MIN:MAX`` like torchrun."""
    parts = text.split(":")
    if len(parts) not in (1, 2) or not all(re.fullmatch(r"[0-9]+", p.strip()) for p in parts):
        raise ConfigError(f"--nnodes {text!r}: expected N or MIN:MAX with whole numbers")
    lo, hi = int(parts[0]), int(parts[-1])
    if lo < 1:
        raise ConfigError(f"--nnodes {text!r}: the minimum must be at least 1")
    if hi < lo:
        raise ConfigError(f"--nnodes {text!r}: the maximum {hi} is below the minimum {lo}")
    if hi > MAX_NODES:
        raise ConfigError(f"--nnodes {text!r}: the number of nodes must be {MAX_NODES_WHY}")
    return lo, hi


def comma_separated_list(value: str) -> list[str]:
    """torchrun's type for the duplicate filters: items split on ``,``; ``,,`` stands for a literal comma."""
    placeholder = "\0"
    return [item.replace(placeholder, ",") for item in value.replace(",,", placeholder).split(",")]


class _FromEnv:
    """The ``type`` of a flag whose default came from its environment variable: the variable's value is checked
    only when it is used (argparse converts a string default only when the flag is not given, as torch does), and
    a bad one is an error naming the variable."""

    def __init__(self, type_: Callable | None, env_name: str, raw: str, choices, flag: str):
        self.type, self.env_name, self.raw, self.choices, self.flag = type_, env_name, raw, choices, flag
        self.__name__ = getattr(type_, "__name__", "value")  # argparse names the type in its own messages

    def __call__(self, value: str):
        if value is self.raw:  # the default itself, not a value typed on the command line
            if self.choices is not None and value not in self.choices:
                raise argparse.ArgumentTypeError(f"${self.env_name}={value!r}: {self.flag} must be one of "
                                                 f"{', '.join(self.choices)}")
            try:
                return self.type(value) if self.type else value
            except (TypeError, ValueError) as exc:
                raise argparse.ArgumentTypeError(f"${self.env_name}={value!r} is not a valid value for {self.flag} "
                                                 f"({exc})") from exc
        return self.type(value) if self.type else value


class _Given(argparse.Action):
    """Stores the value and remembers which option string gave it."""

    env_name = ""  # the environment variable that can replace the default; "" when there is none

    def __call__(self, parser, namespace, values, option_string=None):
        before = _given(namespace).get(self.dest)
        if before is not None and before not in self.option_strings and getattr(namespace, self.dest) != values:
            # Two different flags for one setting (an alias): never let the later one silently win.
            raise ConfigError(f"{before} {getattr(namespace, self.dest)!r} and {option_string} {values!r} disagree; "
                              "give one")
        setattr(namespace, self.dest, values)
        _given(namespace)[self.dest] = option_string


class Env(_Given):
    """torch's ``env`` action: ``PET_<DEST>`` replaces the default."""

    def __init__(self, option_strings, dest, default=None, required=False, env_prefix="PET_", **kwargs):
        self.env_name = f"{env_prefix}{dest.upper()}"
        if self.env_name in os.environ:
            default = os.environ[self.env_name]
            kwargs["type"] = _FromEnv(kwargs.get("type"), self.env_name, default, kwargs.get("choices"),
                                      option_strings[-1])
        if default:
            required = False
        super().__init__(option_strings, dest, default=default, required=required, **kwargs)


class CheckEnv(_Given):
    """torch's ``check_env`` action: a switch; ``PET_<DEST>=1`` (any non-zero integer) turns it on by default."""

    def __init__(self, option_strings, dest, default=False, **kwargs):
        self.env_name = f"PET_{dest.upper()}"
        raw = os.environ.get(self.env_name, "1" if default else "0")
        try:
            default = bool(int(raw))
        except ValueError as exc:
            raise ConfigError(f"${self.env_name}={raw!r}: {option_strings[-1]} takes 0 or 1 from the "
                              "environment") from exc
        super().__init__(option_strings, dest, const=True, default=default, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, self.const, option_string)


class Store(_Given):
    """A plain option (no environment form), remembering that it was given."""


class StoreTrue(_Given):
    def __init__(self, option_strings, dest, default=False, **kwargs):
        super().__init__(option_strings, dest, const=True, default=default, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, self.const, option_string)


def subcommand_flags(p: argparse.ArgumentParser) -> None:
    """The etcd flags of ``status``, ``stop`` and ``events``; torchrun's names for the endpoint and id are aliases."""
    etcd_flags(p)
    p.add_argument(*_both("--rdzv-endpoint"), dest="endpoints", action=Store, help="alias of --etcd-endpoints")
    p.add_argument(*_both("--rdzv-id"), dest="run_id", action=Store, help="alias of --run-id")


def _given(ns: argparse.Namespace) -> dict[str, str]:
    if not hasattr(ns, _SOURCES):
        setattr(ns, _SOURCES, {})
    return getattr(ns, _SOURCES)


def sources(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> dict[str, str]:
    """dest -> where its value came from (``--flag``, ``$PET_FLAG``); dests left at their default are absent."""
    out = {}
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of actions
        env_name = getattr(action, "env_name", "")
        if env_name and env_name in os.environ:
            out[action.dest] = f"${env_name}"
    out.update(_given(ns))
    return out


def _both(*names: str) -> list[str]:
    """A flag's dashed names plus their underscored spellings (torchrun accepts both)."""
    out = list(names)
    for n in names:
        if n.startswith("--") and "-" in n[2:]:
            out.append("--" + n[2:].replace("-", "_"))
    return out


def _torchrun_flags(p: argparse.ArgumentParser) -> None:
    """torch 2.13's ``torch.distributed.run.get_args_parser()``, flag for flag (tests compare the two)."""
    g = p.add_argument_group("torchrun flags (same names, defaults and PET_* variables as torchrun)")
    g.add_argument("--nnodes", action=Env, type=str, default="1:1", help="N or MIN:MAX nodes (default 1:1)")
    g.add_argument(*_both("--nproc-per-node"), action=Env, type=str, default="1",
                   help="workers per node: N, gpu, cpu, xpu or auto (default 1)")
    g.add_argument(*_both("--rdzv-backend"), action=Env, type=str, default="static",
                   help="accepted for any value; with etcd, etcd-v2 or etcd-v3 --rdzv-endpoint is the etcd cluster")
    g.add_argument(*_both("--rdzv-endpoint"), action=Env, type=str, default="",
                   help="with an etcd backend: the etcd endpoints; otherwise not used for coordination")
    g.add_argument(*_both("--rdzv-id"), action=Env, type=str, default="none", help="the job's id (alias --run-id)")
    g.add_argument(*_both("--rdzv-conf"), action=Env, type=str, default="",
                   help="KEY=VALUE,...: torchrun's rendezvous keys and etcd-agent's own options (see docs/flags.md)")
    g.add_argument("--standalone", action=CheckEnv, help="one-node job on a private, embedded etcd")
    g.add_argument(*_both("--max-restarts"), action=Env, type=int, default=0, help="job-wide restart budget")
    g.add_argument(*_both("--monitor-interval"), action=Env, type=float, default=0.1,
                   help="accepted; not needed: worker exits are seen the moment they happen")
    g.add_argument(*_both("--start-method"), action=Env, type=str, default="spawn", choices=list(START_METHODS),
                   help="accepted; workers are always started as new processes, as torchrun does for scripts")
    g.add_argument(*_both("--event-log-handler"), action=Env, type=str, default="null",
                   help="accepted; etcd-agent's events are its log lines and its etcd keys")
    g.add_argument("--role", action=Env, type=str, default="default", help="the workers' ROLE_NAME")
    g.add_argument("-m", "--module", action=CheckEnv, help="run the entrypoint as a module (python -m)")
    g.add_argument(*_both("--no-python"), action=CheckEnv, help="run the entrypoint as a program")
    g.add_argument(*_both("--run-path"), action=CheckEnv,
                   help="run the script as a Python script even with --no-python (torchrun's runpy.run_path)")
    g.add_argument(*_both("--log-dir"), action=Env, type=str, default=None,
                   help="worker logs and error files go here (default: a temporary directory)")
    g.add_argument("-r", "--redirects", action=Env, type=str, default="0",
                   help="streams to log files only: 0-3 or LOCAL_RANK:STD,... (1 stdout, 2 stderr, 3 both)")
    g.add_argument("-t", "--tee", action=Env, type=str, default="0",
                   help="streams to log files and the console, prefixed [<role><local rank>]:")
    g.add_argument(*_both("--local-ranks-filter"), action=Env, type=str, default="",
                   help="only these local ranks reach the console, e.g. 0,1")
    g.add_argument(*_both("--duplicate-stdout-filters"), action=Env, type=comma_separated_list, default=[],
                   help="stdout lines containing any of these also go to filtered_stdout.log")
    g.add_argument(*_both("--duplicate-stderr-filters"), action=Env, type=comma_separated_list, default=[],
                   help="stderr lines containing any of these also go to filtered_stderr.log")
    g.add_argument(*_both("--node-rank"), type=int, action=Env, default=0,
                   help="static lines: pins this node's group rank")
    g.add_argument(*_both("--master-addr"), default="127.0.0.1", type=str, action=Env,
                   help="static lines: the workers' MASTER_ADDR (given with --node-rank)")
    g.add_argument(*_both("--master-port"), default=None, type=int, action=Env,
                   help="static lines: the workers' MASTER_PORT (default: a free port on group rank 0)")
    g.add_argument(*_both("--local-addr"), default=None, type=str, action=Env,
                   help="the address peers reach this node at (default: this host's FQDN address)")
    g.add_argument(*_both("--logs-specs"), default=None, type=str, action=Store,
                   help="accepted when the torchrun.logs_specs entry point exists; etcd-agent's log layout is used")
    g.add_argument(*_both("--numa-binding"), type=str, choices=list(NUMA_MODES), default=None, action=Store,
                   help="accepted; etcd-agent does not bind workers to NUMA nodes (a warning says so)")
    g.add_argument(*_both("--signals-to-handle"), action=Env, type=str, default="SIGTERM,SIGINT,SIGHUP,SIGQUIT",
                   help="signals that make the agent stop its workers with that same signal and leave")
    g.add_argument(*_both("--shutdown-timeout"), action=Env, type=int, default=None,
                   help="grace between the stop signal and SIGKILL (alias of --stop-timeout; also "
                        "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT)")
    g.add_argument(*_both("--virtual-local-rank"), action=CheckEnv,
                   help="LOCAL_RANK=0 and one device per worker through CUDA_VISIBLE_DEVICES")
    for action in g._group_actions:
        action.torchrun = True  # see Parser


def etcd_flags(p: argparse.ArgumentParser) -> None:
    """How to reach etcd and which job: shared by the agent and the status/stop subcommands."""
    g = p.add_argument_group("etcd")
    g.add_argument(*_both("--etcd-endpoints"), action=Env, env_prefix="ETCD_AGENT_", dest="endpoints", default=None,
                   help="etcd client endpoints HOST:PORT[,...] (env ETCD_AGENT_ENDPOINTS)")
    g.add_argument(*_both("--run-id"), action=Env, env_prefix="ETCD_AGENT_", dest="run_id", default=None,
                   help="the job's id, the same on every node (alias of --rdzv-id; env ETCD_AGENT_RUN_ID)")
    g.add_argument(*_both("--etcd-prefix"), dest="root", default=DEFAULT_ROOT, action=Store,
                   help="root of all keys (default %(default)s)")
    g.add_argument(*_both("--etcd-cacert"), dest="cacert", action=Store, help="CA bundle: talk TLS to etcd")
    g.add_argument(*_both("--etcd-cert"), dest="cert", action=Store, help="client certificate (mutual TLS)")
    g.add_argument(*_both("--etcd-key"), dest="key", action=Store, help="client certificate key (mutual TLS)")
    g.add_argument(*_both("--etcd-user"), dest="user", action=Store,
                   help=f"etcd user (TLS only); the password comes from --etcd-password-file or ${PASSWORD_ENV}")
    g.add_argument(*_both("--etcd-password-file"), dest="password_file", action=Store,
                   help="file holding the etcd user's password (its first line); workers never see it")
    g.add_argument(*_both("--etcd-timeout"), dest="etcd_timeout", type=float, default=EtcdConfig.connect_timeout,
                   action=Store, help="seconds to keep trying to reach etcd at start (default %(default)g)")


def _agent_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("etcd-agent options (also accepted as --rdzv-conf keys)")
    g.add_argument(*_both("--node-id"), action=Store, help="this node's id (default: host name plus a short suffix)")
    g.add_argument(*_both("--lease-ttl"), type=int, default=Timings.lease_ttl, action=Store,
                   help="session lease TTL in seconds: a lost node is seen within it (default %(default)s)")
    g.add_argument(*_both("--last-call"), type=float, default=Timings.last_call, action=Store,
                   help="seconds a round waits for more nodes once MIN joined (default %(default)g)")
    g.add_argument(*_both("--join-timeout"), type=float, default=Timings.join_timeout, action=Store,
                   help="seconds to wait for MIN nodes (default %(default)g)")
    g.add_argument(*_both("--stop-timeout"), type=float, default=WorkerConfig.stop_timeout, action=Store,
                   help="grace between the stop signal and SIGKILL for workers (default %(default)g)")
    g.add_argument(*_both("--scale-settle"), type=float, default=Timings.scale_settle, action=Store,
                   help="seconds new nodes are batched before scaling up (default %(default)g)")
    g.add_argument(*_both("--worker-timeout"), type=float, default=AgentConfig.worker_timeout, action=Store,
                   help="restart the job when a worker shows no progress for this many seconds (default "
                        "%(default)g: off; see etcd_agent.progress.beat)")
    g.add_argument(*_both("--max-no-progress-restarts"), type=int, default=0, action=Store,
                   help="end the job failed when this many restarts in a row made no progress beyond the best "
                        "training step reported (progress.beat(step)) (default %(default)s: off)")
    g.add_argument(*_both("--straggler-threshold"), type=float, default=0.0, action=Store,
                   help="name the nodes whose step rate is below the job's median by more than this fraction in "
                        "status, events and metrics; nothing restarts for it (default %(default)g: off)")
    g.add_argument(*_both("--health-check"), dest="health_check", action=Store, default=None,
                   help="a command run before this node joins each round (no shell; exit 0 = healthy): an unhealthy "
                        "node does not join, says why in etcd and checks again after a backoff")
    g.add_argument(*_both("--health-check-timeout"), dest="health_check_timeout", type=float,
                   default=HealthConfig.timeout, action=Store,
                   help="seconds the --health-check command may take; longer is unhealthy (default %(default)g)")
    g.add_argument("--spare", action=StoreTrue,
                   help="a hot spare: registers and joins rounds, but is planned only in place of a lost or "
                        "quarantined member (nodes beyond --nnodes MAX wait the same way)")
    from .topology_flags import topology_flags  # (it imports this module's actions)
    topology_flags(g)
    g.add_argument(*_both("--quarantine-after"), dest="quarantine_after", type=int, default=QuarantinePolicy.after,
                   action=Store, help="this node sits out for --quarantine-cooldown once its workers failed this many "
                                      "times within --quarantine-window (default %(default)s: off)")
    g.add_argument(*_both("--quarantine-window"), dest="quarantine_window", type=float,
                   default=QuarantinePolicy.window, action=Store,
                   help="seconds in which --quarantine-after failures count (default %(default)g)")
    g.add_argument(*_both("--quarantine-cooldown"), dest="quarantine_cooldown", type=float,
                   default=QuarantinePolicy.cooldown, action=Store,
                   help="seconds a quarantined node sits out (default %(default)g)")
    g.add_argument(*_both("--quarantine-scope"), dest="quarantine_scope", default=QuarantinePolicy.scope,
                   action=Store, help="where this job writes quarantine records: job (its own) or cluster (under the "
                                      "root prefix: every job on this etcd skips the node; every job honours "
                                      "cluster records whatever its scope) (default %(default)s)")
    g.add_argument(*_both("--on-quarantine"), dest="on_quarantine", default=None, action=Store,
                   help="a command (no shell) this node's agent runs once when it quarantines the node, with "
                        "ETCD_AGENT_QUARANTINE_NODE, _REASON and _UNTIL set (e.g. deploy/slurm-drain-hook.sh)")
    g.add_argument(*_both("--on-quarantine-timeout"), dest="on_quarantine_timeout", type=float,
                   default=QuarantinePolicy.hook_timeout, action=Store,
                   help="seconds --on-quarantine may run before it is killed; its failure is logged, never fatal "
                        "(default %(default)g)")
    g.add_argument(*_both("--no-restart-exit-code"), dest="no_restart_exit_code", type=int, default=None,
                   action=Store, help="a worker exiting with this code ends the job failed at once, naming it as "
                                      "the root cause and spending no restart (default: off; recommended: "
                                      f"{RECOMMENDED_NO_RESTART_CODE})")
    g.add_argument(*_both("--gpu-drain-timeout"), dest="gpu_drain_timeout", type=float,
                   default=AgentConfig.gpu_drain_timeout, action=Store,
                   help="GPU jobs: seconds to wait for the stopped workers' GPU memory to be released before new "
                        "workers start (default %(default)g; needs nvidia-ml-py)")
    g.add_argument(*_both("--warm-restart"), dest="warm_restart", action=StoreTrue,
                   help="keep one pre-started Python per local rank, with --preload imported, and start each round's "
                        "workers from them (a restart skips the interpreter start and the imports); off by default")
    g.add_argument("--preload", action=Store, default=",".join(WorkerConfig.preload),
                   help="--warm-restart: comma-separated modules the pre-started interpreters import (default "
                        "%(default)s: DDP, FSDP and torch.compile import torch._dynamo on first use; '' for none)")
    g.add_argument(*_both("--metrics-port"), action=Env, env_prefix="ETCD_AGENT_", type=int, default=0,
                   help="serve this agent's Prometheus metrics on this port, on --local-addr or else every interface "
                        "(default 0: off; env ETCD_AGENT_METRICS_PORT; needs etcd-agent[metrics])")
    log_flags(g, "INFO", "agent log level")


def log_flags(g, level: str, what: str) -> None:
    """``--log-level`` (``$ETCD_AGENT_LOG_LEVEL``) and ``--log-format`` (``$ETCD_AGENT_LOG_FORMAT``)."""
    g.add_argument(*_both("--log-level"), action=Env, env_prefix="ETCD_AGENT_", default=level,
                   help=f"{what} (default {level}; env ETCD_AGENT_LOG_LEVEL)")
    g.add_argument(*_both("--log-format"), action=Env, env_prefix="ETCD_AGENT_", default="text",
                   choices=LOG_FORMATS, help="text (default) or json: an object per line (env ETCD_AGENT_LOG_FORMAT)")


class Parser(argparse.ArgumentParser):
    """An abbreviation that torchrun's parser resolves (``--run-`` for ``--run-path``) resolves the same here, even
    where etcd-agent's own flags (``--run-id``) would make it ambiguous. Every usage error is one line (a
    ConfigError), never argparse's usage block; an unknown flag names the closest known one. Arguments after the
    training script are the script's (``training_script_args``) and are never checked."""

    def error(self, message: str):
        raise ConfigError(message)

    def parse_args(self, args=None, namespace=None):
        ns, unknown = self.parse_known_args(args, namespace)
        if unknown:
            raise ConfigError(unrecognized(self, unknown))
        return ns

    def _get_option_tuples(self, option_string):
        found = super()._get_option_tuples(option_string)
        if len(found) > 1:
            torchrun = {id(t[0]): t for t in found if getattr(t[0], "torchrun", False)}
            if len(torchrun) == 1:
                return list(torchrun.values())
        return found


def build_parser(version: str = "") -> argparse.ArgumentParser:
    p = Parser(prog="etcd-agent", usage=USAGE, description=DESCRIPTION, epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    _torchrun_flags(p)
    etcd_flags(p)
    _agent_flags(p)
    p.add_argument("--version", action="version", version=f"etcd-agent {version}")
    p.add_argument("training_script", type=str,
                   help="training script (or module with -m, or program with --no-python)")
    p.add_argument("training_script_args", nargs=argparse.REMAINDER, help="arguments for the training script")
    return p


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    """The command line of ``etcd-agent status``, ``stop``, ``events`` or ``exporter`` (``exporter_flags``)."""
    p = Parser(prog=f"etcd-agent {name}", description=SUBCOMMANDS[name])
    subcommand_flags(p)
    if name == "exporter":
        from .exporter_flags import exporter_flags
        return exporter_flags(p)
    if name == "quarantine":
        from .quarantine import quarantine_flags
        return quarantine_flags(p)
    if name == "status":
        p.add_argument("--json", action="store_true", help="print the state as JSON")
    elif name == "events":
        p.add_argument("--json", action="store_true", help="one JSON object per event")
        p.add_argument("--follow", action="store_true", help="keep printing events until the job has a result")
        p.add_argument("--plot", metavar="FILE", help="draw the history in FILE (.png or .svg); the plot extra")
    else:
        p.add_argument("--reason", default="stopped by an operator", help="recorded in the job's result")
    log_flags(p, "WARNING", "log level on stderr")
    return p
