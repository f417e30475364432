"""This host's accelerators, without importing torch: ``--nproc-per-node`` as torchrun resolves it (``N``, ``gpu``,
``cpu``, ``xpu``, ``auto``), from CUDA_VISIBLE_DEVICES, NVML (``gpu``), the NVIDIA driver, nvidia-smi,
ZE_AFFINITY_MASK and the Intel render nodes; and ``default_node_id``, this host's name made a node id. Invalid values
raise ConfigError naming the flag. Imports ``errors`` and ``node.gpu``; never ``etcd/`` or ``coord/``.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path

from ..errors import ConfigError
from . import gpu

_NUMBER_RE = re.compile(r"[0-9]+")


def resolve_nproc(text: str) -> int:
    """``N``, ``gpu`` (visible GPUs), ``cpu`` (CPU count), ``xpu`` (Intel GPUs) or ``auto`` (GPUs if any, else CPUs),
    like torchrun."""
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
            return count_xpus() or os.cpu_count() or 1
        raise ConfigError("--nproc-per-node gpu: no visible GPU (checked CUDA_VISIBLE_DEVICES, "
                          "/proc/driver/nvidia/gpus and nvidia-smi)")
    if value == "xpu":
        count = count_xpus()
        if count:
            return count
        raise ConfigError("--nproc-per-node xpu: no visible Intel GPU (checked ZE_AFFINITY_MASK and /sys/class/drm)")
    raise ConfigError(f"--nproc-per-node {text!r}: expected a number, 'gpu', 'cpu', 'xpu' or 'auto'")


def count_xpus(drm: str = "/sys/class/drm") -> int:
    """Visible Intel GPUs without importing torch: ZE_AFFINITY_MASK wins, then the render nodes of vendor 0x8086."""
    mask = os.environ.get("ZE_AFFINITY_MASK")
    if mask is not None:
        return len({item.split(".")[0].strip() for item in mask.split(",") if item.strip()})
    root = Path(drm)
    count = 0
    for node in root.glob("renderD*") if root.is_dir() else ():
        try:
            if (node / "device" / "vendor").read_text().strip().lower() == "0x8086":
                count += 1
        except OSError:
            continue
    return count


def count_gpus() -> int:
    """Visible NVIDIA GPUs without importing torch: CUDA_VISIBLE_DEVICES wins, then NVML (``gpu.py``, when
    nvidia-ml-py is installed), then the driver's view."""
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
    found = gpu.count()
    if found is not None:
        return found
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
    """``--node-id`` when none is given: the host name plus a short unique suffix, so two agents on one host never
    collide."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:100] or "node"
    return f"{host}-{uuid.uuid4().hex[:6]}"
