"""Frozen configuration records and their validation: a base module.

Guarantees:
- Everything the agent is told (flags, environment) becomes one of these records before anything runs. Invalid
  values raise ConfigError with a message naming the flag; nothing here asserts, touches etcd or starts processes.
- Every default (timings, timeouts, the quarantine policy) is stated once, as a field default of these records:
  the flags (``cli/flags.py``), the torchrun backend (``torch/settings.py``) and the tools read it from there
  (``Timings.lease_ttl``, ``WorkerConfig.stop_timeout``, ...). ``Timings`` also holds the rules the etcd session
  and the agent derive their periods by.

Imports only ``errors`` and ``secure`` (the TLS file checks); never anything above the base modules.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
from typing import NamedTuple

from .errors import ConfigError
from .secure import check_tls_files

DEFAULT_ROOT = "/etcd-agent"
TORCHRUN_NPROC = "torchrun"  # a job spec's nproc_per_node under torchrun's etcd-v3 backend: torch assigns worker ranks
TORCHRUN_STOP_TIMEOUT = 30.0  # that backend: how long torch's agent may take to stop its workers
TORCHRUN_CLOSE_TIMEOUT = 30.0  # that backend: how long shutdown waits for the job's end to be recorded
TORCHRUN_STORE_TIMEOUT = 300.0  # that backend: the store's get/wait timeout when torchrun gives none
NO_RESTART_LIMIT = 1_000_000_000  # a job-wide budget this large means none (torchrun counts restarts per node)
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_NODE_ID_RE = _RUN_ID_RE
MAX_REQUEST_TIMEOUT = 3.0  # the longest etcd request attempt; a client outside any session (status, the store) uses it
MIN_LEASE_TTL = 2  # etcd's minimum lease TTL
ELECTION, ANSWER, RETRY = 2.0, 0.25, 0.15  # Timings.keepalive's worst case: etcd's election, an answer, a short retry


@dataclasses.dataclass(frozen=True)
class EtcdConfig:
    """How to reach the etcd cluster."""

    endpoints: tuple[tuple[str, int], ...]
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = None
    request_timeout: float = MAX_REQUEST_TIMEOUT  # one RPC attempt; an agent's: request_timeout_for(its lease TTL)
    connect_timeout: float = 10.0  # total retry budget of the first contact
    tls: bool = False  # https:// endpoints: TLS even without ca_cert (then with the system's CA bundle)

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ConfigError("--etcd-endpoints: at least one HOST:PORT is required")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("--etcd-cert and --etcd-key must be given together")
        if (self.user is None) != (self.password is None):
            raise ConfigError("--etcd-user needs a password: --etcd-password-file FILE or $ETCD_AGENT_ETCD_PASSWORD")
        if self.cert is not None and not self.secure:
            raise ConfigError("--etcd-cert/--etcd-key need TLS: give --etcd-cacert or https:// endpoints (client "
                              "certificates are only sent over TLS)")
        for flag, path in (("--etcd-cacert", self.ca_cert), ("--etcd-cert", self.cert), ("--etcd-key", self.key)):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{flag}: no such file: {path}")
            if path is not None and not os.access(path, os.R_OK):
                raise ConfigError(f"{flag}: cannot read {path}")
        check_tls_files(self.ca_cert, self.cert, self.key)

    @property
    def secure(self) -> bool:
        return self.tls or self.ca_cert is not None

    def describe(self) -> str:
        """How this connection is protected, for the log: plaintext, TLS or mutual TLS, and the auth."""
        if not self.secure:
            how = "plaintext (no TLS)"
        else:
            ca = f"CA {self.ca_cert}" if self.ca_cert else "the system's CA bundle"
            how = f"mutual TLS (client certificate {self.cert}, {ca})" if self.cert else f"TLS ({ca})"
        return how + (f", password auth as user {self.user}" if self.user else ", no password auth")


# The most nodes a job may have: a round's plan is one etcd value (one [node, nproc, address] per member), and etcd
# refuses a request over 1.5 MiB; 10,000 members with long names and IPv6 addresses stay well under that.
MAX_NODES = 10_000
MAX_NODES_WHY = f"at most {MAX_NODES} (a round's plan, one etcd value, holds every member)"


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What every agent of one run must agree on; stored once under ``P/spec``."""

    min_nodes: int
    max_nodes: int
    nproc_per_node: str  # as given: a number, "gpu", "cpu" or "auto"; nodes may resolve it differently
    max_restarts: int
    max_no_progress_restarts: int = 0  # the no-progress guard's K (0: off): recorded in P/restarts by the first agent
    straggler_threshold: float = 0.0  # a fraction below the median step rate (0: off): recorded in P/spec

    def __post_init__(self) -> None:
        if self.min_nodes < 1:
            raise ConfigError(f"--nnodes: the minimum must be at least 1, got {self.min_nodes}")
        if self.max_nodes < self.min_nodes:
            raise ConfigError(f"--nnodes {self.min_nodes}:{self.max_nodes}: the maximum is below the minimum")
        if self.max_nodes > MAX_NODES:
            raise ConfigError(f"--nnodes {self.min_nodes}:{self.max_nodes}: the maximum must be {MAX_NODES_WHY}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be 0 or more, got {self.max_restarts}")
        if self.max_no_progress_restarts < 0:
            raise ConfigError(f"--max-no-progress-restarts must be 0 (off) or more: {self.max_no_progress_restarts}")
        if not 0 <= self.straggler_threshold < 1:  # also NaN
            raise ConfigError(f"--straggler-threshold must be a fraction from 0 (off) to below 1, got "
                              f"{self.straggler_threshold}")


STD_NONE, STD_OUT, STD_ERR, STD_ALL = 0, 1, 2, 3  # torchrun's Std flags: which of stdout/stderr a setting covers
_STD_VALUE_RE = re.compile(r"^[0-3]$")
_STD_MAP_RE = re.compile(r"^[0-9]+:[0-3](,[0-9]+:[0-3])*$")


@dataclasses.dataclass(frozen=True)
class StdSpec:
    """A torchrun ``--redirects``/``--tee`` value: one Std for every local rank, or a per-local-rank map (ranks
    missing from a map get ``STD_NONE``, as in torchrun)."""

    value: int = STD_NONE  # used when ``per_rank`` is empty
    per_rank: tuple[tuple[int, int], ...] = ()

    def for_rank(self, local_rank: int) -> int:
        if not self.per_rank:
            return self.value
        return dict(self.per_rank).get(local_rank, STD_NONE)

    @classmethod
    def parse(cls, text: str, flag: str) -> "StdSpec":
        """``0``-``3`` or ``LOCAL_RANK:STD,...`` such as ``0:3,1:1`` (torchrun's ``Std.from_str``)."""
        text = text.strip()
        if _STD_VALUE_RE.fullmatch(text):
            return cls(int(text))
        if _STD_MAP_RE.fullmatch(text):
            pairs = [tuple(int(x) for x in item.split(":")) for item in text.split(",")]
            return cls(STD_NONE, tuple(sorted(dict(pairs).items())))
        raise ConfigError(f"{flag} {text!r}: expected 0 (none), 1 (stdout), 2 (stderr), 3 (both) or a per-local-rank "
                          "map such as 0:3,1:1")


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """How this node starts its workers, and where their output goes (torchrun's meanings)."""

    entrypoint: str
    args: tuple[str, ...]
    nproc: int
    module: bool = False
    no_python: bool = False
    log_dir: str = ""
    redirects: StdSpec = StdSpec()  # --redirects: these streams go to the log files only
    tee: StdSpec = StdSpec()  # --tee: these streams go to the log files and to the console, prefixed
    local_ranks_filter: frozenset[int] | None = None  # --local-ranks-filter: only these local ranks reach the console
    duplicate_stdout_filters: tuple[str, ...] = ()  # lines containing any of these also go to filtered_stdout.log
    duplicate_stderr_filters: tuple[str, ...] = ()
    role: str = "default"  # ROLE_NAME, and the console prefix [<role><local rank>]:
    virtual_local_rank: bool = False  # LOCAL_RANK=0 and one device per worker through CUDA_VISIBLE_DEVICES
    signals_to_handle: str = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"  # exported as TORCHELASTIC_SIGNALS_TO_HANDLE
    stop_timeout: float = 10.0
    python: str = ""  # interpreter for workers; default: the agent's own
    warm_restart: bool = False  # --warm-restart: start each round's workers from pre-started interpreters (warm.py)
    # --preload: what those interpreters import before they are handed a round. torch._dynamo too: DDP, FSDP and
    # torch.compile import it on first use (0.75 s of CPU per process on a 2-core test machine).
    preload: tuple[str, ...] = ("torch", "torch._dynamo")

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ConfigError(f"--nproc-per-node must be at least 1, got {self.nproc}")
        if self.module and self.no_python:
            raise ConfigError("-m/--module and --no-python cannot be used together")
        if not self.stop_timeout >= 0:  # also NaN
            raise ConfigError(f"--stop-timeout must be 0 or more, got {self.stop_timeout}")
        if not self.role:
            raise ConfigError("--role must not be empty")
        if self.warm_restart and self.no_python:
            raise ConfigError("--warm-restart pre-starts Python interpreters; --no-python programs always start cold")

    def command(self) -> list[str]:
        """The argv every worker runs (torchrun's rules for -m and --no-python)."""
        if self.no_python:
            return [self.entrypoint, *self.args]
        python = self.python or os.environ.get("PYTHON_EXEC") or sys.executable
        if self.module:
            return [python, "-u", "-m", self.entrypoint, *self.args]
        return [python, "-u", self.entrypoint, *self.args]


class KeepAlive(NamedTuple):
    """How the session renews its lease (``Timings.keepalive``)."""

    period: float  # from one keepalive to the next
    attempt: float  # the longest a keepalive waits for its answer
    retry: float  # the longest a try after a failed one waits
    pause: float  # the least time from a failed try's send to the next try's


@dataclasses.dataclass(frozen=True)
class Timings:
    """Every time the coordination depends on, and their relations, checked once here (client-go's leader election
    validates lease duration, renew deadline and retry period the same way).

    Leases are renewed by the rule of ``keepalive(members)`` (``etcd/session.py`` says why); an agent whose keepalives
    fail declares its session lost ``fence_margin`` s before expiry and stops its workers within ``fence_grace``.
    One etcd request attempt (``request_timeout``, by default ``request_timeout_for(lease_ttl)``) must fit in the
    TTL less the margin, or a single slow request could outlive the lease.
    """

    lease_ttl: int = 5
    request_timeout: float | None = None  # None: request_timeout_for(lease_ttl)
    last_call: float = 3.0
    join_timeout: float = 600.0
    scale_settle: float = 1.0

    def __post_init__(self) -> None:
        if self.request_timeout is None:
            object.__setattr__(self, "request_timeout", request_timeout_for(self.lease_ttl))
        for flag, value in (("--last-call", self.last_call), ("--join-timeout", self.join_timeout),
                            ("--scale-settle", self.scale_settle)):
            if value != value:  # NaN compares false with everything, so no range check below would catch it
                raise ConfigError(f"{flag} must be a number of seconds, got {value}")
        if self.lease_ttl < MIN_LEASE_TTL:
            raise ConfigError(f"--lease-ttl must be at least {MIN_LEASE_TTL} seconds (etcd's minimum TTL), got "
                              f"{self.lease_ttl}")
        if self.last_call < 0:
            raise ConfigError(f"--last-call must be 0 or more, got {self.last_call}")
        if self.join_timeout <= 0:
            raise ConfigError(f"--join-timeout must be positive, got {self.join_timeout}")
        if self.scale_settle < 0:
            raise ConfigError(f"--scale-settle must be 0 or more, got {self.scale_settle}")
        if not 0 < self.request_timeout <= self.lease_ttl - self.fence_margin:
            raise ConfigError(f"the etcd request timeout ({self.request_timeout:g} s) must be positive and at most "
                              f"--lease-ttl {self.lease_ttl} less the fencing margin ({self.fence_margin:g} s)")

    def keepalive(self, members: int = 1) -> KeepAlive:
        """The keepalive rule for ``members`` etcd endpoints; ``etcd/session.py`` says why, with its worst cases."""
        if members < 2:
            return KeepAlive(self.lease_ttl / 3, self.lease_ttl / 9, self.lease_ttl / 9, 0.2)
        budget = self.lease_ttl - self.fence_margin - ELECTION - ANSWER  # the period and two retries after an election
        period = min(self.lease_ttl / 3, max(self.lease_ttl / 6, budget - 2 * RETRY))
        return KeepAlive(period, period / 3, min(period / 3, max(RETRY, (budget - period) / 2)), 0.05)

    @property
    def fence_margin(self) -> float:
        """How long before lease expiry a disconnected agent declares its session lost."""
        return min(max(1.0, self.lease_ttl * 0.25), self.lease_ttl / 2)

    @property
    def fence_grace(self) -> float:
        """How long workers get to stop when the agent fences itself: within the margin, with time to spare."""
        return max(0.0, self.fence_margin - 0.5)

    @property
    def watch_probe(self) -> float:
        """The unit of a watch stream's liveness check (``etcd/liveness.py``): a silent stream is probed when its
        member was not heard from for 2 units (a live member answers a keepalive every TTL/3 < 2 units), or after
        10 silent units in any case, and is dead when a probe stays unanswered for 2 units."""
        return max(0.5, self.lease_ttl / 5)

    @property
    def holder_wait(self) -> float:
        """How long a claim waits for a holder that may have just died: its lease ends within the TTL."""
        return self.lease_ttl + 1.0


def request_timeout_for(lease_ttl: int) -> float:
    """The etcd request timeout for a lease TTL: a third of it, within 0.5-3 s, so that a request to a failed
    member leaves time for another before the lease could suffer."""
    return max(0.5, min(MAX_REQUEST_TIMEOUT, lease_ttl / 3))


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    command: tuple[str, ...] = ()  # --health-check, split; () when not given
    timeout: float = 60.0  # --health-check-timeout
    gpus: int | None = None  # GPUs this node's workers use (--nproc-per-node gpu); None: not a GPU job

    @property
    def active(self) -> bool:
        return bool(self.command) or self.gpus is not None


MAX_PERIOD = 365 * 24 * 3600.0  # the longest quarantine window and cooldown: a quarantine's end is a time to print
RECOMMENDED_NO_RESTART_CODE = 87  # not 1/2 (Python), 126/127 (shell), 64-78 (sysexits), 128+n (signals) or 255
QUARANTINE_SCOPES = ("job", "cluster")  # --quarantine-scope: every job honours cluster records whatever its scope


@dataclasses.dataclass(frozen=True)
class QuarantinePolicy:
    """``--quarantine-after K`` failures of this node's workers within ``--quarantine-window`` seconds make it sit out
    for ``--quarantine-cooldown`` seconds (K = 0: off)."""

    after: int = 0
    window: float = 600.0
    cooldown: float = 600.0
    scope: str = "job"  # --quarantine-scope: where this job writes its records (job: P/quarantine/, cluster: root's)
    on_quarantine: tuple[str, ...] = ()  # --on-quarantine, split: run once per quarantine this node's agent writes
    hook_timeout: float = 60.0  # --on-quarantine-timeout: the hook is killed after this many seconds

    @property
    def active(self) -> bool:
        return self.after > 0

    def __post_init__(self) -> None:
        if self.after < 0:
            raise ConfigError(f"--quarantine-after must be 0 (off) or more, got {self.after}")
        if self.scope not in QUARANTINE_SCOPES:
            raise ConfigError(f"--quarantine-scope must be one of {', '.join(QUARANTINE_SCOPES)}, got {self.scope!r}")
        if not 0 < self.hook_timeout <= MAX_PERIOD:
            raise ConfigError(f"--on-quarantine-timeout must be positive seconds, got {self.hook_timeout:g}")
        if not 0 < self.window <= MAX_PERIOD or not 0 < self.cooldown <= MAX_PERIOD:  # inf, nan: no wall time
            raise ConfigError(f"--quarantine-window and --quarantine-cooldown must be positive and at most "
                              f"{MAX_PERIOD:.0f} s (a year), got {self.window:g} and {self.cooldown:g}")


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """Everything one agent needs."""

    run_id: str
    node_id: str
    spec: JobSpec
    workers: WorkerConfig
    etcd: EtcdConfig
    root: str = DEFAULT_ROOT
    local_addr: str = ""
    lease_ttl: int = Timings.lease_ttl
    last_call: float = Timings.last_call
    join_timeout: float = Timings.join_timeout
    scale_settle: float = Timings.scale_settle
    worker_timeout: float = 0.0  # 0: hang detection off
    node_rank: int | None = None  # --node-rank of a static line: pins this node's group rank
    master_addr: str | None = None  # --master-addr/--master-port of a static line: the workers' MASTER_ADDR/PORT
    master_port: int | None = None
    signals: tuple[int, ...] = (15, 2, 1, 3)  # --signals-to-handle: the agent leaves on these, forwarding each
    health: HealthConfig = HealthConfig()  # the health gate before each join (--health-check, GPUs through NVML)
    spare: bool = False  # --spare: planned only in place of a lost or quarantined member
    quarantine: QuarantinePolicy = QuarantinePolicy()  # --quarantine-after/-window/-cooldown (off by default)
    gpu_drain_timeout: float = 30.0  # GPU jobs: how long the last workers' GPU memory may take to be released
    metrics_port: int = 0  # --metrics-port: this agent's Prometheus metrics (``metrics``); 0: off
    topology: str = ""  # --topology: this node's path, checked (``schema/topology.py``); "" none
    no_restart_exit_code: int | None = None  # --no-restart-exit-code: a worker exiting with it ends the job failed

    def __post_init__(self) -> None:
        if not _RUN_ID_RE.fullmatch(self.run_id):  # fullmatch: "$" would let a trailing newline through
            raise ConfigError(f"--run-id {self.run_id!r}: use 1-128 letters, digits, '.', '_' or '-'")
        if not _NODE_ID_RE.fullmatch(self.node_id):
            raise ConfigError(f"--node-id {self.node_id!r}: use 1-128 letters, digits, '.', '_' or '-'")
        if not self.root.startswith("/") or self.root.endswith("/") or "//" in self.root:
            raise ConfigError(f"--etcd-prefix {self.root!r}: must start with '/' and not end with '/'")
        self.timings  # noqa: B018 - validates the timings and their relations
        if not self.gpu_drain_timeout >= 0:
            raise ConfigError(f"--gpu-drain-timeout must be 0 or more, got {self.gpu_drain_timeout}")
        if not self.worker_timeout >= 0:  # also NaN
            raise ConfigError(f"--worker-timeout must be 0 (off) or more, got {self.worker_timeout}")
        if self.node_rank is not None and not 0 <= self.node_rank < self.spec.max_nodes:
            raise ConfigError(f"--node-rank {self.node_rank} is outside 0..{self.spec.max_nodes - 1} "
                              f"(--nnodes allows at most {self.spec.max_nodes} node(s))")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ConfigError(f"--master-port {self.master_port}: expected 1-65535")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"--metrics-port {self.metrics_port}: expected 1-65535, or 0 (off)")
        if self.no_restart_exit_code is not None and not 1 <= self.no_restart_exit_code <= 255:
            raise ConfigError(f"--no-restart-exit-code {self.no_restart_exit_code}: expected an exit code 1-255 "
                              f"(recommended: {RECOMMENDED_NO_RESTART_CODE})")

    @property
    def timings(self) -> Timings:
        return Timings(self.lease_ttl, self.etcd.request_timeout, self.last_call, self.join_timeout, self.scale_settle)

    @property
    def address(self) -> str:
        return self.local_addr or default_address()


_AGENT_OWN_ENV: set[str] = set()  # variables the agent set for its own process; workers never inherit them


def set_agent_env(name: str, value: str) -> None:
    """Set ``name`` for the agent's own process unless the user set it; workers do not inherit what this sets."""
    if name not in os.environ:
        os.environ[name] = value
        _AGENT_OWN_ENV.add(name)


def worker_base_env() -> dict[str, str]:
    """The environment workers start from: the agent's, less what the agent set only for itself."""
    return {k: v for k, v in os.environ.items() if k not in _AGENT_OWN_ENV}


def default_address() -> str:
    """The address peers (and workers, as MASTER_ADDR of group rank 0) reach this node at when --local-addr is not
    given: the fully qualified host name, as torchrun's rendezvous uses (``socket.getfqdn(socket.gethostname())``)."""
    return socket.getfqdn(socket.gethostname()) or socket.gethostname()
