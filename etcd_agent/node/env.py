"""What a worker starts with: its environment, and the log root its files go under.

Guarantees:

- ``worker_env`` is pure: ``base`` (the agent's environment less what the agent set only for itself,
  ``config.worker_base_env``) plus exactly what torchrun 2.13 sets, plus ``ETCD_AGENT_ROUND`` for fencing. Like
  torchrun it sets ``ROLE_NAME`` = ``--role`` and ``TORCHELASTIC_SIGNALS_TO_HANDLE``, and never
  ``PYTHONUNBUFFERED`` (workers run ``python -u``). With ``--virtual-local-rank`` a worker gets ``LOCAL_RANK=0``
  and the local-rank-th entry of ``CUDA_VISIBLE_DEVICES`` (or the local rank when that is unset; a local rank
  beyond the list is a ConfigError); otherwise ``CUDA_VISIBLE_DEVICES`` is inherited unchanged.
- ``log_root`` is ``--log-dir``, or one temporary directory per agent process, made once however many groups ask.

Imports ``config``, ``errors``, ``logs`` and ``node.logtree`` only; never ``etcd/``, ``coord/`` or the agent.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import Mapping

from . import logtree
from ..config import WorkerConfig
from ..errors import ConfigError
from ..logs import Log, get as get_logger
from .api import Assignment

log = get_logger("etcd_agent.node.workers")
_default_log_root: str | None = None  # made on first use when no --log-dir was given
_default_lock = threading.Lock()


def log_root(cfg: WorkerConfig, logger: Log | None = None) -> str:
    """``--log-dir``, or one temporary directory per agent process (made on first use, however many groups)."""
    global _default_log_root
    if cfg.log_dir:
        return cfg.log_dir
    with _default_lock:
        if _default_log_root is None:
            _default_log_root = tempfile.mkdtemp(prefix="etcd_agent_logs_")
            (logger or log).debug("no --log-dir: worker logs go to %s", _default_log_root)  # the start-up line says it
    return _default_log_root


def check_log_tree(cfg: WorkerConfig, run_id: str, logger: Log | None = None) -> str:
    """At start: make (or check) the run's private directory under the log root (``logtree``); its path, or
    ConfigError when it is not the agent's."""
    root = log_root(cfg, logger)
    with logtree.opened(root, [run_id]):
        pass
    return os.path.join(root, run_id)


def worker_env(cfg: WorkerConfig, a: Assignment, local_rank: int, base: Mapping[str, str],
               error_file: str) -> dict[str, str]:
    """The environment of one worker: ``base`` plus exactly what torchrun sets. Pure; ConfigError when
    ``cfg.virtual_local_rank`` finds no device for ``local_rank`` in ``base``'s CUDA_VISIBLE_DEVICES."""
    env = dict(base)
    rank = a.rank_offset + local_rank
    env.update({
        "RANK": str(rank), "LOCAL_RANK": str(local_rank), "GROUP_RANK": str(a.group_rank),
        "ROLE_RANK": str(rank), "ROLE_NAME": cfg.role, "LOCAL_WORLD_SIZE": str(cfg.nproc),
        "WORLD_SIZE": str(a.world_size), "GROUP_WORLD_SIZE": str(a.group_world_size),
        "ROLE_WORLD_SIZE": str(a.world_size), "MASTER_ADDR": a.master_addr, "MASTER_PORT": str(a.master_port),
        "TORCHELASTIC_RESTART_COUNT": str(a.restart_count), "TORCHELASTIC_MAX_RESTARTS": str(a.max_restarts),
        "TORCHELASTIC_RUN_ID": a.run_id, "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCHELASTIC_ERROR_FILE": error_file, "ETCD_AGENT_ROUND": str(a.round),
        "TORCHELASTIC_SIGNALS_TO_HANDLE": cfg.signals_to_handle,  # torchrun exports it in its own environment
    })
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if cfg.nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    if cfg.virtual_local_rank:  # torchrun's _set_local_rank_env
        env["LOCAL_RANK"] = "0"
        env["CUDA_VISIBLE_DEVICES"] = _visible_device(base.get("CUDA_VISIBLE_DEVICES"), local_rank)
    return env


def _visible_device(visible: str | None, local_rank: int) -> str:
    if visible is None:
        return str(local_rank)
    devices = visible.split(",")
    if local_rank >= len(devices):
        raise ConfigError(f"--virtual-local-rank: local rank {local_rank} has no device of its own: "
                          f"CUDA_VISIBLE_DEVICES={visible!r} lists {len(devices)}")
    return devices[local_rank].strip()
