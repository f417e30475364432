"""The checks of ``doctor`` on this node, one ``Check`` each: the address peers reach it at, the master port, the
entrypoint, the workers' interpreter and torch, the accelerators ``--nproc-per-node`` counts.

Guarantees: a check starts nothing that outlives it and changes nothing: a port is bound and released at once (never
listened on), the workers' interpreter runs once to look for torch without importing it (``PROBE``), a GPU count
reads what ``--nproc-per-node gpu`` reads. Every check returns a ``Check``; none raises for what it finds. Imports
the base modules, ``cli.launch`` and ``node.hostinfo``; never torch.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import ipaddress
import os
import socket
import subprocess
import sys

from ..config import AgentConfig, WorkerConfig, worker_base_env
from ..errors import ConfigError
from ..node.hostinfo import count_gpus, count_xpus
from .launch import check_entrypoint

PROBE_S = 5.0  # the workers' interpreter: start, look for torch, print; well under a second when healthy
# Run by the workers' interpreter: its version, then torch's version and where it is, without importing torch
# (importing it takes most of a second).
PROBE = """import importlib.metadata, importlib.util, sys
print(sys.version.split()[0])
spec = importlib.util.find_spec("torch")
if spec is None:
    print("")
else:
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = "of unknown version"
    print(version, "in", (list(spec.submodule_search_locations or []) or [spec.origin])[0])
"""


class Level(enum.Enum):
    OK = "ok"
    WARN = "warn"  # worth fixing; a launch works
    FAIL = "FAIL"  # a launch would fail, or a job would not work
    SKIP = "skip"  # not checked: what it needs failed first, or it does not apply; the line says which


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of ``doctor``'s report: ``ok`` with the fact, ``warn`` or ``FAIL`` with the fix."""

    level: Level
    name: str
    text: str

    def line(self) -> str:
        return f"  {self.level.value:<4}  {self.name}: {self.text}"


def ok(name: str, text: str) -> Check:
    return Check(Level.OK, name, text)


def warn(name: str, text: str) -> Check:
    return Check(Level.WARN, name, text)


def fail(name: str, text: str) -> Check:
    return Check(Level.FAIL, name, text)


def skip(name: str, text: str) -> Check:
    return Check(Level.SKIP, name, text)


def local_address(cfg: AgentConfig) -> Check:
    """``cfg.address`` (``--local-addr``, else this host's name) must resolve, and in a multi-node job not first to a
    loopback address: it is this node's address in every plan, and MASTER_ADDR when it is group rank 0."""
    name, addr = "local address", cfg.address
    what = f"--local-addr {addr}" if cfg.local_addr else f"this host's name {addr} (no --local-addr)"
    try:
        ips = list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)))
    except (socket.gaierror, UnicodeError) as exc:
        return fail(name, f"{what} does not resolve ({getattr(exc, 'strerror', None) or exc}): give --local-addr "
                          "with this node's address on the network the other nodes reach it on")
    first = ipaddress.ip_address(ips[0].split("%")[0])
    if first.is_loopback and cfg.spec.max_nodes > 1:
        hosts = "" if cfg.local_addr else " (or make this host's name resolve to that address, in /etc/hosts or DNS)"
        return fail(name, f"{what} resolves to {', '.join(ips)}, loopback: the other nodes of this --nnodes "
                          f"{cfg.spec.min_nodes}:{cfg.spec.max_nodes} job cannot reach this node there (nor its "
                          f"workers' MASTER_ADDR); give --local-addr with this node's address on the cluster "
                          f"network{hosts}")
    loopback = " (loopback: enough for a one-node job)" if first.is_loopback else ""
    return ok(name, f"{what} resolves to {', '.join(ips)}{loopback}")


def _bind(host: str, port: int) -> OSError | None:
    """None when a listener could take ``host:port`` now (SO_REUSEADDR, as torch's TCPStore and the agent's port
    choice bind), else why not. The socket never listens and is closed at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        return exc
    return None


def _why(exc: OSError) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def master_port(cfg: AgentConfig) -> list[Check]:
    """The agent picks a free port on ``cfg.address`` each round (falling back to every interface where that
    address cannot be bound, ``agent.master_port``); a static ``--master-port`` must be free on its host."""
    name, addr = "master port", cfg.address
    problem = _bind(addr, 0)
    if problem is None:
        found = ok(name, f"a free port binds on {addr} (the agent picks one each round: MASTER_PORT when this node "
                         "is group rank 0)")
    elif _bind("0.0.0.0", 0) is None:
        found = warn(name, f"{addr} cannot be bound here ({_why(problem)}); the agent binds MASTER_PORT on every "
                           f"interface instead, so peers must reach this node at {addr} (NAT): if they cannot, give "
                           "--local-addr with an address of this node")
    else:
        found = fail(name, f"no TCP port can be bound here ({_why(problem)}): check the machine's network setup")
    if cfg.master_port is None:
        return [found]
    host, port = cfg.master_addr or addr, cfg.master_port
    taken = _bind(host, port)
    if taken is None:
        pinned = ok("--master-port", f"{port} is free on {host}")
    elif taken.errno == errno.EADDRINUSE:
        pinned = fail("--master-port", f"{port} is taken on {host} (another process listens there, perhaps a job "
                                       "still running): stop it, or give another --master-port")
    elif taken.errno == errno.EADDRNOTAVAIL:
        pinned = ok("--master-port", f"{host}:{port} is another machine's address: its node checks the port")
    else:
        pinned = fail("--master-port", f"cannot bind {host}:{port} ({_why(taken)}): check --master-addr and "
                                       "--master-port")
    return [found, pinned]


def entrypoint(w: WorkerConfig) -> Check:
    """What ``launch.check_entrypoint`` refuses at a launch, as a check."""
    kind = "program" if w.no_python else "module" if w.module else "training script"
    try:
        check_entrypoint(w)
    except ConfigError as exc:
        return fail("entrypoint", str(exc))
    if w.module and w.command()[0] != sys.executable:
        return skip("entrypoint", f"module {w.entrypoint}: not looked for in $PYTHON_EXEC's path")
    where = "" if w.no_python or w.module else f" ({os.path.abspath(w.entrypoint)})"
    return ok("entrypoint", f"{kind} {w.entrypoint} found{where}")


def start_probe(w: WorkerConfig) -> subprocess.Popen | OSError | None:
    """Start ``PROBE`` in the workers' interpreter with the workers' environment (None: ``--no-python``, the
    program brings its own). Started first: it runs while the other checks do."""
    if w.no_python:
        return None
    try:
        return subprocess.Popen([w.command()[0], "-c", PROBE], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=worker_base_env())
    except OSError as exc:
        return exc


def interpreter(w: WorkerConfig, probe: subprocess.Popen | OSError | None) -> tuple[str, Check]:
    """``(the interpreter's version, the torch check)`` from the probe ``start_probe`` started."""
    name = "torch"
    if probe is None:
        return "", skip(name, f"--no-python: the program {w.entrypoint} brings its own interpreter")
    python = w.command()[0]
    if isinstance(probe, OSError):
        return "", fail(name, f"the workers' interpreter {python} does not run ({_why(probe)}): fix $PYTHON_EXEC, "
                              "or unset it to run workers on the agent's own interpreter")
    try:
        out, err = probe.communicate(timeout=PROBE_S)
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.communicate()
        return "", fail(name, f"the workers' interpreter {python} did not answer within {PROBE_S:g} s")
    lines = out.splitlines()
    if probe.returncode != 0 or len(lines) < 2:
        tail = (err.strip().splitlines() or ["no output"])[-1]
        return "", fail(name, f"the workers' interpreter {python} failed (exit {probe.returncode}: {tail})")
    version, torch = lines[0], lines[1]
    if not torch:
        return version, fail(name, f"the workers' interpreter {python} (Python {version}) cannot import torch: pip "
                                   "install torch into the environment the agent runs in (workers run on the "
                                   "agent's interpreter, or $PYTHON_EXEC)")
    return version, ok(name, f"torch {torch} (found by the workers' interpreter, not imported)")


def accelerators(cfg: AgentConfig) -> Check | None:
    """What ``--nproc-per-node gpu``, ``xpu`` or ``auto`` counts on this node (None for a number or ``cpu``)."""
    value, name = cfg.spec.nproc_per_node, "GPUs"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    source = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    if value == "xpu":
        found = count_xpus()
        if not found:
            return fail("XPUs", "--nproc-per-node xpu: no visible Intel GPU (checked ZE_AFFINITY_MASK and "
                                "/sys/class/drm): check the driver, ZE_AFFINITY_MASK, or give --nproc-per-node N")
        return ok("XPUs", f"{found} visible Intel GPU(s): {found} worker(s) on this node")
    if value not in ("gpu", "auto"):
        return None
    found = count_gpus()
    if found:
        return ok(name, f"{found} visible GPU(s){source}: {found} worker(s) on this node")
    if value == "auto":
        return ok(name, f"no visible GPU{source}: --nproc-per-node auto starts one worker per CPU "
                        f"({cfg.workers.nproc})")
    return fail(name, f"--nproc-per-node gpu: no visible GPU{source} (checked CUDA_VISIBLE_DEVICES, NVML, "
                      "/proc/driver/nvidia/gpus and nvidia-smi): check the driver (nvidia-smi) and "
                      "CUDA_VISIBLE_DEVICES, or give --nproc-per-node N")
