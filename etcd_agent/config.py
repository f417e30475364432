"""Frozen configuration objects and their validation.

Everything the agent is told (flags, environment) becomes one of these dataclasses before anything runs. Invalid
values raise ConfigError with a message naming the flag; nothing here asserts, touches etcd or starts processes.
Imports only ``errors``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import uuid
from pathlib import Path

from .errors import ConfigError

DEFAULT_ROOT = "/etcd-agent"
DEFAULT_PORT = 2379
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_NODE_ID_RE = _RUN_ID_RE
_NUMBER_RE = re.compile(r"[0-9]+")


@dataclasses.dataclass(frozen=True)
class EtcdConfig:
    """How to reach the etcd cluster."""

    endpoints: tuple[tuple[str, int], ...]
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = None
    request_timeout: float = 3.0  # one RPC attempt
    connect_timeout: float = 10.0  # total retry budget of the first contact

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ConfigError("--etcd-endpoints: at least one HOST:PORT is required")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("--etcd-cert and --etcd-key must be given together")
        if (self.user is None) != (self.password is None):
            raise ConfigError("--etcd-user needs a password in $ETCD_AGENT_ETCD_PASSWORD")
        if self.cert is not None and self.ca_cert is None:
            raise ConfigError("--etcd-cert/--etcd-key need --etcd-cacert: client certificates are only sent over TLS")
        for flag, path in (("--etcd-cacert", self.ca_cert), ("--etcd-cert", self.cert), ("--etcd-key", self.key)):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{flag}: no such file: {path}")
            if path is not None and not os.access(path, os.R_OK):
                raise ConfigError(f"{flag}: cannot read {path}")

    @property
    def secure(self) -> bool:
        return self.ca_cert is not None


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What every agent of one run must agree on; stored once under ``P/spec``."""

    min_nodes: int
    max_nodes: int
    nproc_per_node: str  # as given: a number, "gpu", "cpu" or "auto"; nodes may resolve it differently
    max_restarts: int

    def __post_init__(self) -> None:
        if self.min_nodes < 1:
            raise ConfigError(f"--nnodes: the minimum must be at least 1, got {self.min_nodes}")
        if self.max_nodes < self.min_nodes:
            raise ConfigError(f"--nnodes {self.min_nodes}:{self.max_nodes}: the maximum is below the minimum")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be 0 or more, got {self.max_restarts}")

    def to_json(self) -> dict:
        return {"min_nodes": self.min_nodes, "max_nodes": self.max_nodes,
                "nproc_per_node": self.nproc_per_node, "max_restarts": self.max_restarts}


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """How this node starts its workers."""

    entrypoint: str
    args: tuple[str, ...]
    nproc: int
    module: bool = False
    no_python: bool = False
    log_dir: str = ""
    tee: bool = False
    stop_timeout: float = 10.0
    python: str = ""  # interpreter for workers; default: the agent's own

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ConfigError(f"--nproc-per-node must be at least 1, got {self.nproc}")
        if self.module and self.no_python:
            raise ConfigError("-m/--module and --no-python cannot be used together")
        if self.stop_timeout < 0:
            raise ConfigError(f"--stop-timeout must be 0 or more, got {self.stop_timeout}")

    def command(self) -> list[str]:
        """The argv every worker runs (torchrun's rules for -m and --no-python)."""
        if self.no_python:
            return [self.entrypoint, *self.args]
        python = self.python or os.environ.get("PYTHON_EXEC") or _sys_executable()
        if self.module:
            return [python, "-u", "-m", self.entrypoint, *self.args]
        return [python, "-u", self.entrypoint, *self.args]


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
    lease_ttl: int = 5
    last_call: float = 3.0
    join_timeout: float = 600.0
    scale_settle: float = 1.0
    worker_timeout: float = 0.0  # 0: hang detection off

    def __post_init__(self) -> None:
        if not _RUN_ID_RE.match(self.run_id):
            raise ConfigError(f"--run-id {self.run_id!r}: use 1-128 letters, digits, '.', '_' or '-'")
        if not _NODE_ID_RE.match(self.node_id):
            raise ConfigError(f"--node-id {self.node_id!r}: use 1-128 letters, digits, '.', '_' or '-'")
        if not self.root.startswith("/") or self.root.endswith("/") or "//" in self.root:
            raise ConfigError(f"--etcd-prefix {self.root!r}: must start with '/' and not end with '/'")
        if self.lease_ttl < 2:
            raise ConfigError(f"--lease-ttl must be at least 2 seconds (etcd's minimum TTL), got {self.lease_ttl}")
        if self.last_call < 0:
            raise ConfigError(f"--last-call must be 0 or more, got {self.last_call}")
        if self.join_timeout <= 0:
            raise ConfigError(f"--join-timeout must be positive, got {self.join_timeout}")
        if self.worker_timeout < 0:
            raise ConfigError(f"--worker-timeout must be 0 (off) or more, got {self.worker_timeout}")
        if self.scale_settle < 0:
            raise ConfigError(f"--scale-settle must be 0 or more, got {self.scale_settle}")
        if self.etcd.request_timeout >= self.lease_ttl:
            raise ConfigError("the etcd request timeout must be shorter than --lease-ttl")

    @property
    def address(self) -> str:
        return self.local_addr or default_address()


def _sys_executable() -> str:
    import sys

    return sys.executable


def parse_endpoints(text: str, flag: str = "--etcd-endpoints") -> tuple[tuple[str, int], ...]:
    """``host:port[,host:port...]``; a scheme (http:// or https://) is accepted and ignored; port defaults to 2379."""
    out = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        item = re.sub(r"^[a-z][a-z0-9+.-]*://", "", item, flags=re.IGNORECASE).rstrip("/")
        host, port = item, DEFAULT_PORT
        if item.startswith("["):  # [v6]:port
            host, bracket, rest = item[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ConfigError(f"{flag}: {item!r}: write an IPv6 endpoint as [ADDRESS]:PORT")
            if rest:
                port = _port(rest[1:], flag, item)
        elif item.count(":") == 1:
            host, p = item.split(":")
            port = _port(p, flag, item)
        elif ":" in item and not _is_ipv6(item):
            raise ConfigError(f"{flag}: {item!r} is not HOST:PORT")
        if not host:
            raise ConfigError(f"{flag}: {item!r} has no host")
        out.append((host, port))
    if not out:
        raise ConfigError(f"{flag}: at least one HOST:PORT is required")
    return tuple(out)


def _is_ipv6(text: str) -> bool:
    import ipaddress

    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def _port(text: str, flag: str, item: str) -> int:
    if not _NUMBER_RE.fullmatch(text) or not 0 < int(text) < 65536:
        raise ConfigError(f"{flag}: {item!r} has a bad port {text!r}")
    return int(text)


def parse_nnodes(text: str) -> tuple[int, int]:
    """``N`` or ``MIN:MAX`` like torchrun."""
    parts = text.split(":")
    if len(parts) not in (1, 2) or not all(_NUMBER_RE.fullmatch(p.strip()) for p in parts):
        raise ConfigError(f"--nnodes {text!r}: expected N or MIN:MAX with whole numbers")
    lo, hi = int(parts[0]), int(parts[-1])
    if lo < 1:
        raise ConfigError(f"--nnodes {text!r}: the minimum must be at least 1")
    if hi < lo:
        raise ConfigError(f"--nnodes {text!r}: the maximum {hi} is below the minimum {lo}")
    return lo, hi


def resolve_nproc(text: str) -> int:
    """``N``, ``gpu`` (visible GPUs), ``cpu`` (CPU count) or ``auto`` (GPUs if any, else CPUs), like torchrun."""
    value = text.strip().lower()
    if _NUMBER_RE.fullmatch(value):
        if int(value) < 1:
            raise ConfigError(f"--nproc-per-node must be at least 1, got {text!r}")
        return int(value)
    if value == "cpu":
        return os.cpu_count() or 1
    if value in ("gpu", "auto"):
        count = count_gpus()
        if count:
            return count
        if value == "auto":
            return os.cpu_count() or 1
        raise ConfigError("--nproc-per-node gpu: no visible GPU (checked CUDA_VISIBLE_DEVICES, "
                          "/proc/driver/nvidia/gpus and nvidia-smi)")
    raise ConfigError(f"--nproc-per-node {text!r}: expected a number, 'gpu', 'cpu' or 'auto'")


def count_gpus() -> int:
    """Visible NVIDIA GPUs without importing torch: CUDA_VISIBLE_DEVICES wins, then the driver's view."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        items = [v for v in visible.split(",") if v.strip()]
        # CUDA stops at the first invalid entry such as -1.
        count = 0
        for item in items:
            if item.strip().startswith("-"):
                break
            count += 1
        return count
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return sum(1 for _ in proc.iterdir())
    return _nvidia_smi_count()


def _nvidia_smi_count() -> int:
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def default_node_id() -> str:
    """Host name plus a short unique suffix, so two agents on one host never collide."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:100] or "node"
    return f"{host}-{uuid.uuid4().hex[:6]}"


def default_address() -> str:
    """The address peers reach this node at: the FQDN's address when it resolves, else the host name."""
    name = socket.getfqdn() or socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name
