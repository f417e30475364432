"""GPU facts through NVML, without torch: how many GPUs this node has and whether any is in a failed state.

NVML comes from NVIDIA's maintained binding ``nvidia-ml-py`` (``import pynvml``), an optional dependency: without it,
or without a GPU driver, every function here says "unknown" (None) and the agent works as before; it logs why once.
A failed state is what NVML reports where the GPU supports it: pages waiting to be retired (a reset is due) and
uncorrectable ECC errors since the last driver load. XID errors arrive as NVML events only while a process listens
for them, so they are not read here (a node's ``--health-check`` command can read them from the kernel log).
Imports ``logs`` only; never ``etcd/`` or ``coord/``.
"""

from __future__ import annotations

import threading
import time

from .. import logs

log = logs.get("etcd_agent.node.gpu")

_lock = threading.Lock()
_state: dict = {}  # "nvml": the initialised module, or None once it is known to be unavailable


def nvml(loader=None):
    """The initialised ``pynvml`` module, or None when NVML is not available here (said once, at INFO)."""
    with _lock:
        if "nvml" in _state:
            return _state["nvml"]
        try:
            module = loader() if loader else __import__("pynvml")
            module.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError (no driver), OSError (no libnvidia-ml)
            log.info("NVML is not available (%s: %s): GPU health checks are off; GPU counts come from "
                     "CUDA_VISIBLE_DEVICES or nvidia-smi", type(exc).__name__, exc)
            module = None
        _state["nvml"] = module
        return module


def forget() -> None:
    """Look for NVML again on the next call (tests)."""
    with _lock:
        _state.clear()


def count(module=None) -> int | None:
    """How many GPUs NVML sees (None: NVML not available)."""
    module = module or nvml()
    if module is None:
        return None
    try:
        return int(module.nvmlDeviceGetCount())
    except Exception as exc:  # noqa: BLE001
        log.warning("NVML could not count the GPUs: %s", exc)
        return None


def problems(expected: int | None, module=None) -> list[str] | None:
    """What is wrong with this node's GPUs: fewer than ``expected`` visible, pages pending retirement, uncorrectable
    ECC errors. None when NVML is not available (nothing can be said)."""
    module = module or nvml()
    if module is None:
        return None
    found = count(module)
    if found is None:
        return ["NVML could not count the GPUs"]
    out = []
    if expected is not None and found < expected:
        out.append(f"{found} GPU(s) visible, {expected} expected")
    for index in range(found):
        try:
            handle = module.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # noqa: BLE001 - a GPU that fell off the bus
            out.append(f"GPU {index} cannot be reached: {exc}")
            continue
        pending = _supported(module, module.nvmlDeviceGetRetiredPagesPendingStatus, handle)
        if pending:
            out.append(f"GPU {index} has memory pages waiting to be retired (it needs a reset)")
        ecc = _supported(module, module.nvmlDeviceGetTotalEccErrors, handle,
                         module.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, module.NVML_VOLATILE_ECC)
        if ecc:
            out.append(f"GPU {index} has {ecc} uncorrectable ECC error(s) since the driver loaded")
    return out


def holders(pids, module=None) -> dict[int, int] | None:
    """Which of ``pids`` hold GPU memory now, with how many bytes (all GPUs together); None when NVML is not
    available."""
    module = module or nvml()
    if module is None:
        return None
    wanted, held = set(pids), {}
    for index in range(count(module) or 0):
        try:
            handle = module.nvmlDeviceGetHandleByIndex(index)
            procs = list(module.nvmlDeviceGetComputeRunningProcesses(handle))
        except module.NVMLError:
            continue
        for p in procs:
            if p.pid in wanted:
                held[p.pid] = held.get(p.pid, 0) + int(p.usedGpuMemory or 0)
    return held


def wait_drained(pids, timeout: float, module=None, poll: float = 0.02) -> dict[int, int]:
    """Wait up to ``timeout`` seconds until none of ``pids`` holds GPU memory; returns those still holding some
    (empty: drained, or NVML not available). NVML has no event for it: it looks every ``poll`` seconds (a look is a
    few NVML calls per GPU; a restart waits for the memory, so the look comes often)."""
    deadline = time.monotonic() + timeout
    while True:
        held = holders(pids, module) if pids else {}
        if not held or time.monotonic() >= deadline:
            return held or {}
        time.sleep(poll)


def _supported(module, fn, *args):
    """``fn(*args)``, or None where this GPU does not support the query."""
    try:
        return fn(*args)
    except module.NVMLError:
        return None
