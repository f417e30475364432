"""From a parsed torchrun-style command line to what the agent runs: an AgentConfig, whether the job needs an
embedded etcd, and the notes to log. Pure apart from reading files and the environment; starts nothing.

The rules (docs/from-torchrun.md documents them for users):

- Where etcd is: ``--etcd-endpoints`` (or ``$ETCD_AGENT_ENDPOINTS``), or ``--rdzv-endpoint`` when
  ``--rdzv-backend`` is ``etcd``, ``etcd-v2`` or ``etcd-v3``. With another backend ``--rdzv-endpoint`` is not etcd and
  is not used for coordination. Two sources naming different clusters are an error naming both.
- No etcd endpoint: a one-node job (``--nnodes`` at most 1, or ``--standalone``) runs on an embedded etcd. A
  multi-node c10d line (``--rdzv-backend c10d --rdzv-endpoint HOST[:PORT]``, torchrun's port 29400 by default) runs
  on the etcd that the agent able to bind HOST:PORT serves there for the job (``job_etcd``), as torchrun's c10d
  backend hosts its store; one warning says it is a single point of failure. Any other multi-node job is refused
  with one line saying what to add.
- The run id: ``--run-id`` (etcd-agent's) or ``--rdzv-id`` (an error when they differ). Where torchrun makes a
  fresh uuid (``--standalone``; a one-node static line without endpoint or master port) a one-node job on the
  embedded etcd makes a fresh id too (8 hex digits, short in every log line: unique enough on an etcd of its own;
  a uuid on a shared one), replacing ``--rdzv-id`` as torchrun does. Otherwise ``--rdzv-id``; without one a
  multi-node static line derives an id from its master address and port (the same on every node, distinct per
  job), and anything else gets torchrun's default ``none``.
- Static lines (``--rdzv-backend static``, torchrun's default): a given ``--node-rank`` pins the group rank, a given
  ``--master-addr``/``--master-port`` become MASTER_ADDR/MASTER_PORT. Other backends ignore them with a note, as
  torchrun does.
- ``--rdzv-conf`` (its one table and rules: ``rdzv_conf.py``): torchrun's keys map onto the agent's options where
  they mean something; the agent's own options may be given there too; an unknown key gets a warning naming it. A
  value given both as a flag and as a key must agree.
- The entrypoint (script, module or program) must exist before anything starts.

Imports the base modules, ``cli.flags``, ``cli.rdzv_conf``, ``cli.topology_flags`` and, from ``node/``, the flag
parsers of ``hostinfo``, ``health``, ``hooks`` and ``warm``; never torch, ``etcd/`` or ``coord/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.machinery
import os
import re
import shutil
import signal
import sys
import uuid

from ..config import (AgentConfig, EtcdConfig, JobSpec, QuarantinePolicy, StdSpec, Timings, WorkerConfig,
                      request_timeout_for)
from ..endpoints import endpoint_scheme, parse_endpoints
from ..errors import ConfigError
from ..node import health, hooks
from ..node.hostinfo import default_node_id, resolve_nproc
from ..node.warm import parse_preload
from ..secure import keep_secret
from . import rdzv_conf, topology_flags
from .flags import PASSWORD_ENV, parse_nnodes, sources

ETCD_BACKENDS = ("etcd", "etcd-v2", "etcd-v3")
EMBEDDED_ENDPOINT = "127.0.0.1:2379"  # placeholder until the embedded etcd has its port
TORCHRUN_MASTER_PORT = 29500  # torchrun's MASTER_PORT for a static line that names no port
C10D_PORT = 29400  # torchrun's c10d rendezvous port when --rdzv-endpoint names none
SHUTDOWN_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"


@dataclasses.dataclass(frozen=True)
class Launch:
    cfg: AgentConfig
    embedded: bool  # start a private etcd for this one-node job
    serve: tuple[str, int] | None = None  # a c10d line's HOST, PORT: serve the job's etcd there, or use the one there
    notes: tuple[str, ...] = ()  # warnings to log once logging is set up
    etcd_flag: str = "--etcd-endpoints"  # where the etcd endpoints came from (a flag, or $ETCD_AGENT_ENDPOINTS)


def _apply_conf(ns: argparse.Namespace, given: dict[str, str], notes: list[str]) -> None:
    """Fold ``--rdzv-conf`` into the namespace; a key that contradicts a flag given explicitly is an error."""
    source = given.get("rdzv_conf", "--rdzv-conf")
    conf = rdzv_conf.read(rdzv_conf.parse(ns.rdzv_conf, source), rdzv_conf.LAUNCH, unknown="warn", source=source)
    rdzv_conf.check_protocol(conf, bool(ns.cacert), "--etcd-cacert", source)
    notes += conf.notes
    for dest, value in conf.values.items():
        if dest == "protocol":
            continue  # checked: TLS follows from the CA and the endpoints' scheme
        where = conf.given[dest]
        if dest in given and getattr(ns, dest) != value:
            raise ConfigError(f"{given[dest]} {getattr(ns, dest)!r} and {where}={value!r} disagree; give one")
        setattr(ns, dest, value)
        given.setdefault(dest, where)


def _endpoints(ns: argparse.Namespace, given: dict[str, str], notes: list[str]) -> tuple[str, str] | None:
    """``(text, the flag it came from)`` of the etcd endpoints, or None when no etcd was named."""
    etcd = (ns.endpoints, given.get("endpoints", "--etcd-endpoints")) if ns.endpoints else None
    rdzv = (ns.rdzv_endpoint, given.get("rdzv_endpoint", "--rdzv-endpoint")) if ns.rdzv_endpoint else None
    backend = ns.rdzv_backend
    if ns.standalone:
        if etcd:
            raise ConfigError(f"--standalone starts its own etcd: drop {etcd[1]}")
        if rdzv:
            notes.append(f"--standalone: {rdzv[1]} {rdzv[0]} is ignored (as under torchrun)")
        return None
    if rdzv and backend in ETCD_BACKENDS:
        if etcd and parse_endpoints(etcd[0], etcd[1]) != parse_endpoints(rdzv[0], rdzv[1]):
            raise ConfigError(f"{rdzv[1]} {rdzv[0]} (--rdzv-backend {backend}) and {etcd[1]} {etcd[0]} name "
                              "different etcd clusters; give one of them")
        return rdzv
    if rdzv and etcd:
        notes.append(f"--rdzv-backend {backend}: {rdzv[1]} {rdzv[0]} is not an etcd endpoint and is not used for "
                     f"coordination; etcd-agent coordinates through etcd at {etcd[0]} ({etcd[1]})")
    return etcd


def _missing_etcd(ns: argparse.Namespace, given: dict[str, str]) -> ConfigError:
    hint = ""
    if ns.rdzv_endpoint:
        hint = (f" ({given.get('rdzv_endpoint', '--rdzv-endpoint')} {ns.rdzv_endpoint} is a {ns.rdzv_backend} "
                "endpoint, not etcd)")
    return ConfigError(f"--nnodes {ns.nnodes} is a multi-node job and etcd-agent coordinates nodes through etcd{hint}: "
                       f"add --etcd-endpoints HOST:2379 (the same etcd on every node), or --rdzv-backend etcd-v3 "
                       "with --rdzv-endpoint HOST:2379, or (one node then serves an etcd for the job) --rdzv-backend "
                       "c10d with --rdzv-endpoint HOST:PORT")


def _c10d_endpoint(ns: argparse.Namespace, given: dict[str, str], notes: list[str]) -> tuple[str, int]:
    """A multi-node c10d line without etcd: the ``(host, port)`` where one of its agents serves the job's etcd."""
    flag = given.get("rdzv_endpoint", "--rdzv-endpoint")
    text = (ns.rdzv_endpoint or "").strip()
    if ns.rdzv_backend != "c10d" or not text:
        raise _missing_etcd(ns, given)
    (host, port), *more = parse_endpoints(text, flag)
    if more:
        raise ConfigError(f"{flag} {text}: a c10d endpoint is one HOST:PORT (where one node serves the job's etcd); "
                          "to name an etcd cluster use --etcd-endpoints")
    if not re.search(r"(^[^:]*|\]):[0-9]+$", re.sub(r"^https?://", "", text, flags=re.IGNORECASE).rstrip("/")):
        port = C10D_PORT  # as torchrun's c10d backend
    notes.append(f"{flag} {text} (--rdzv-backend c10d) without an etcd cluster: the agent that can bind {host}:{port} "
                 "serves the job's etcd there, a single point of failure like torchrun's c10d store (if that node "
                 "goes, the job ends); to survive any node, run an etcd cluster and add --etcd-endpoints "
                 "HOST:2379[,HOST:2379...] on every node")
    return host, port


def _torchrun_makes_an_id(ns: argparse.Namespace, hi: int) -> bool:
    """Where torchrun replaces the run id with a fresh uuid: ``--standalone``, and a one-node static line that
    names no endpoint and no master port (torchrun switches it to a private c10d rendezvous)."""
    return bool(ns.standalone or (ns.rdzv_backend == "static" and not ns.rdzv_endpoint and ns.master_port is None
                                  and hi == 1))


def _run_id(ns: argparse.Namespace, given: dict[str, str], embedded: bool, hi: int, static_master: tuple | None,
            notes: list[str]) -> str:
    ours, theirs = ns.run_id, ns.rdzv_id if "rdzv_id" in given else None
    if ours and theirs and ours != theirs:
        raise ConfigError(f"{given.get('run_id', '--run-id')} {ours!r} and {given['rdzv_id']} {theirs!r} disagree; "
                          "give one")
    if ours:
        return ours
    if _torchrun_makes_an_id(ns, hi) and (embedded or not theirs):
        if theirs:
            notes.append(f"{given['rdzv_id']} {theirs} is replaced by a fresh run id, as torchrun does for this "
                         "one-node line (--run-id keeps an id)")
        return uuid.uuid4().hex[:8] if embedded else str(uuid.uuid4())
    if theirs:
        return theirs
    if static_master is not None and not embedded:
        addr, port = static_master  # the same on every node of the line, distinct for jobs sharing the etcd
        return re.sub(r"[^A-Za-z0-9_.-]", "-", f"static-{addr}-{port}").strip("-")[:128]
    return ns.rdzv_id  # torchrun's default, "none"


def _static(ns: argparse.Namespace, given: dict[str, str], notes: list[str], multi: bool):
    """``(node_rank, master_addr, master_port)`` that a static line pins; None for each that it leaves open."""
    named = [d for d in ("node_rank", "master_addr", "master_port") if d in given]
    if ns.rdzv_backend != "static":
        for dest in named:
            notes.append(f"{given[dest]} is only used with --rdzv-backend static (as under torchrun); it is ignored "
                         f"with --rdzv-backend {ns.rdzv_backend}")
        return None, None, None
    rank = ns.node_rank if "node_rank" in given else None
    addr = ns.master_addr if "master_addr" in given else None
    port = ns.master_port if "master_port" in given else None
    if rank is not None and rank < 0:
        raise ConfigError(f"{given['node_rank']} {rank}: must be 0 or more")
    if addr is not None and port is None and multi:
        port = TORCHRUN_MASTER_PORT
    if not multi and addr is None and port is not None:
        addr = ns.master_addr  # one node: torchrun's default 127.0.0.1
    return rank, addr, port


def parse_signals(text: str, source: str = "--signals-to-handle") -> tuple[int, ...]:
    out = []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        sig = getattr(signal, name.upper(), None)
        if not isinstance(sig, signal.Signals) or not name.upper().startswith("SIG") or name.upper().startswith("SIG_"):
            raise ConfigError(f"{source} {text!r}: {name!r} is not a signal name such as SIGTERM or SIGUSR1")
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"{source} {text!r}: {sig.name} cannot be handled")
        out.append(int(sig))
    return tuple(dict.fromkeys(out))


def _ranks_filter(text: str, source: str) -> frozenset[int] | None:
    if not text:
        return None
    try:
        ranks = frozenset(int(x) for x in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"{source} {text!r}: expected a comma-separated list of local ranks such as 0,1,2") from exc
    if any(r < 0 for r in ranks):
        raise ConfigError(f"{source} {text!r}: local ranks are 0 or more")
    return ranks


def _stop_timeout(ns: argparse.Namespace, given: dict[str, str]) -> float:
    if ns.shutdown_timeout is not None:
        if "stop_timeout" in given and ns.stop_timeout != ns.shutdown_timeout:
            raise ConfigError(f"{given['shutdown_timeout']} {ns.shutdown_timeout} and {given['stop_timeout']} "
                              f"{ns.stop_timeout:g} disagree; give one")
        return float(ns.shutdown_timeout)
    if "stop_timeout" not in given and os.environ.get(SHUTDOWN_ENV):
        try:
            return float(os.environ[SHUTDOWN_ENV])
        except ValueError as exc:
            raise ConfigError(f"${SHUTDOWN_ENV}={os.environ[SHUTDOWN_ENV]!r}: expected seconds") from exc
    return ns.stop_timeout


def _notes_for_accepted(ns: argparse.Namespace, notes: list[str]) -> None:
    if ns.numa_binding:
        notes.append(f"--numa-binding {ns.numa_binding}: etcd-agent does not bind workers to NUMA nodes; the workers "
                     "run unbound (use numactl in a --no-python wrapper to bind them)")
    if ns.logs_specs:
        from importlib import metadata

        if not metadata.entry_points(group="torchrun.logs_specs", name=ns.logs_specs):
            raise ConfigError(f"--logs-specs {ns.logs_specs}: no entry point "
                              f"torchrun.logs_specs[{ns.logs_specs}] is installed")
        notes.append(f"--logs-specs {ns.logs_specs}: etcd-agent writes its own log layout (it never imports torch, "
                     "so it cannot run a LogsSpecs class); see --log-dir")
    if ns.run_path and ns.no_python:
        notes.append("--run-path takes precedence over --no-python (as under torchrun): the script runs in Python")


def _preload(ns: argparse.Namespace, given: dict[str, str]) -> tuple[str, ...]:
    flag = given.get("preload", "--preload")
    if "preload" in given and not ns.warm_restart:
        raise ConfigError(f"{flag} {ns.preload!r} only matters with --warm-restart: add it, or drop {flag}")
    return parse_preload(ns.preload, flag)


def check_entrypoint(w: WorkerConfig) -> None:
    """The script, module or program the workers run must exist: a clear error before anything starts."""
    if w.no_python:
        if os.sep in w.entrypoint:
            if not os.path.isfile(w.entrypoint) or not os.access(w.entrypoint, os.X_OK):
                raise ConfigError(f"--no-python: {w.entrypoint!r} is not an executable file")
        elif shutil.which(w.entrypoint) is None:
            raise ConfigError(f"--no-python: program {w.entrypoint!r} is not on PATH")
        return
    python = w.command()[0]
    if shutil.which(python) is None:
        raise ConfigError(f"the workers' Python interpreter {python!r} does not exist ($PYTHON_EXEC)")
    if not w.module:
        if not os.path.isfile(w.entrypoint):
            raise ConfigError(f"training script {w.entrypoint!r} not found (in {os.getcwd()})")
        return
    if python == sys.executable and not _module_exists(w.entrypoint):
        raise ConfigError(f"-m/--module: no module named {w.entrypoint!r} (searched the current directory, "
                          "$PYTHONPATH and the interpreter's path)")


def _module_exists(name: str) -> bool:
    """Whether ``python -m name`` finds the module, without importing (and so running) any package code."""
    path = [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + sys.path[1:]
    if name.split(".")[0] in sys.builtin_module_names:
        return True
    spec = None
    for part in name.split("."):
        spec = importlib.machinery.PathFinder.find_spec(part, path)
        if spec is None:
            return False
        path = list(spec.submodule_search_locations or [])
    return spec is not None


def _nproc(text: str, preflight: bool) -> int:
    """``--nproc-per-node`` resolved on this machine; in ``preflight`` a missing accelerator resolves to one worker
    (a stand-in: ``doctor`` checks the accelerators itself and says what is missing)."""
    try:
        return resolve_nproc(text)
    except ConfigError:
        if not preflight or text.strip().lower() not in ("gpu", "xpu"):
            raise
        return 1


def resolve(parser: argparse.ArgumentParser, ns: argparse.Namespace, preflight: bool = False) -> Launch:
    """Everything the agent needs from one command line; every check runs here, before anything starts. With
    ``preflight`` (``doctor``) the facts of this machine a launch refuses, a missing entrypoint or no visible GPU for
    ``--nproc-per-node gpu``, are left to the caller's own checks: everything else is still resolved."""
    given = sources(parser, ns)
    notes: list[str] = []
    _apply_conf(ns, given, notes)
    _notes_for_accepted(ns, notes)
    lo, hi = parse_nnodes(ns.nnodes)
    endpoints, serve = _endpoints(ns, given, notes), None
    if endpoints is None and hi > 1:
        if ns.standalone:
            raise ConfigError(f"--standalone runs a one-node job; --nnodes {ns.nnodes} needs a shared etcd "
                              "(--etcd-endpoints)")
        serve = _c10d_endpoint(ns, given, notes)
        host, port = serve  # an IPv6 host in brackets
        endpoints = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                     given.get("rdzv_endpoint", "--rdzv-endpoint"))
    embedded = endpoints is None
    rank, master_addr, master_port = _static(ns, given, notes, multi=hi > 1)
    run_id = _run_id(ns, given, embedded, hi, None if master_addr is None and master_port is None
                     else (master_addr or "any", master_port or "any"), notes)
    if run_id == "none" and not embedded and serve is None:  # an etcd served for this job is shared by no other
        notes.append("no --rdzv-id given: using torchrun's default run id 'none'; jobs that share this etcd need "
                     "distinct --rdzv-id values")
    workers = WorkerConfig(
        ns.training_script, tuple(ns.training_script_args), _nproc(ns.nproc_per_node, preflight), ns.module,
        ns.no_python and not ns.run_path, ns.log_dir or "",
        redirects=StdSpec.parse(ns.redirects, given.get("redirects", "--redirects")),
        tee=StdSpec.parse(ns.tee, given.get("tee", "--tee")),
        local_ranks_filter=_ranks_filter(ns.local_ranks_filter,
                                         given.get("local_ranks_filter", "--local-ranks-filter")),
        duplicate_stdout_filters=tuple(ns.duplicate_stdout_filters),  # as torchrun: "" matches every line
        duplicate_stderr_filters=tuple(ns.duplicate_stderr_filters),
        role=ns.role, virtual_local_rank=ns.virtual_local_rank, signals_to_handle=ns.signals_to_handle,
        stop_timeout=_stop_timeout(ns, given), warm_restart=ns.warm_restart, preload=_preload(ns, given))
    signals = parse_signals(ns.signals_to_handle, given.get("signals_to_handle", "--signals-to-handle"))
    gpus = ns.nproc_per_node.strip().lower() == "gpu"
    cfg = AgentConfig(
        run_id=run_id, node_id=ns.node_id or default_node_id(),
        spec=JobSpec(lo, hi, ns.nproc_per_node.strip().lower(), ns.max_restarts, ns.max_no_progress_restarts,
                     ns.straggler_threshold), workers=workers,
        etcd=etcd_config(ns, *(endpoints or (EMBEDDED_ENDPOINT, "--etcd-endpoints")), lease_ttl=ns.lease_ttl),
        root=ns.root, local_addr=ns.local_addr or "", lease_ttl=ns.lease_ttl, topology=topology_flags.resolve(ns),
        last_call=ns.last_call, join_timeout=ns.join_timeout, scale_settle=ns.scale_settle,
        worker_timeout=ns.worker_timeout, node_rank=rank, master_addr=master_addr, master_port=master_port,
        signals=signals, gpu_drain_timeout=ns.gpu_drain_timeout, spare=ns.spare, metrics_port=ns.metrics_port,
        quarantine=QuarantinePolicy(ns.quarantine_after, ns.quarantine_window, ns.quarantine_cooldown,
                                    ns.quarantine_scope, hooks.parse(ns.on_quarantine), ns.on_quarantine_timeout),
        no_restart_exit_code=ns.no_restart_exit_code, health=health.parse(ns.health_check, ns.health_check_timeout,
                                                                          workers.nproc if gpus else None))
    if not preflight:
        check_entrypoint(workers)  # after the flags: a bad flag is named first
    return Launch(cfg, embedded, serve, tuple(notes), endpoints[1] if endpoints else "--etcd-endpoints")


_env_password: str | None = None  # $ETCD_AGENT_ETCD_PASSWORD, once taken out of the environment


def etcd_password(ns: argparse.Namespace, file_flag: str = "--etcd-password-file") -> str | None:
    """The etcd user's password: the first line of ``--etcd-password-file``, else ``$ETCD_AGENT_ETCD_PASSWORD``.
    Either way it leaves this process's environment at once (workers, and anything else started from here, never
    inherit it) and is kept for ``redact`` (a worker that prints it anyway has it hidden in its failure report)."""
    global _env_password
    popped = os.environ.pop(PASSWORD_ENV, None)
    if popped is not None:  # moved from the environment into this process's memory, for every later config
        _env_password = popped
        keep_secret(popped)
    from_env = _env_password
    path = getattr(ns, "password_file", None)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{file_flag} {path}: cannot read it: {exc.strerror}") from None
        if not password:
            raise ConfigError(f"{file_flag} {path}: the file's first line is empty")
        keep_secret(password)
    else:
        password = from_env
    if path and not ns.user:
        raise ConfigError(f"{file_flag} {path}: a password file needs --etcd-user")
    return password if ns.user else None


def etcd_config(ns: argparse.Namespace, text: str | None, flag: str = "--etcd-endpoints",
                lease_ttl: int = Timings.lease_ttl) -> EtcdConfig:
    """The etcd connection from the etcd flags (also used by the status and stop subcommands)."""
    if not text:
        raise ConfigError("--etcd-endpoints is required")
    if ns.etcd_timeout <= 0:
        raise ConfigError(f"--etcd-timeout must be positive, got {ns.etcd_timeout}")
    password = etcd_password(ns)
    scheme = endpoint_scheme(text, flag)
    if scheme == "http" and ns.cacert:
        raise ConfigError(f"{flag} {text}: http:// means plaintext, but --etcd-cacert asks for TLS; use https:// or "
                          "a bare HOST:PORT")
    if ns.user and ns.cacert is None and scheme != "https":
        raise ConfigError("--etcd-user needs TLS (--etcd-cacert or https:// endpoints): over plaintext the password "
                          "and the auth token would cross the network readable, so gRPC refuses to send them")
    # One RPC attempt must leave time for another member before the lease (and the job) could suffer.
    return EtcdConfig(parse_endpoints(text, flag), ns.cacert, ns.cert, ns.key, ns.user, password,
                      tls=scheme == "https", request_timeout=request_timeout_for(lease_ttl),
                      connect_timeout=ns.etcd_timeout)
