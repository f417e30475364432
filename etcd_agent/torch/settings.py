"""``--rdzv-conf`` of torchrun's ``etcd-v3`` backend: torch's keys and the agent's options, checked, into the
agent's config. The keys, their meanings and the keep-alive rule are ``cli/rdzv_conf.py``'s one table, shared with
etcd-agent's own command line; here a key the backend does not know is a ConfigError naming it (torchrun would
otherwise run on without it), as are a bad value, one setting given twice with two values and a password on the
command line. Defaults are the configuration records' (``config.py``). Imports no torch: torch's parameters are
read by their attributes (``endpoint``, ``run_id``, ``min_nodes``, ``max_nodes``, ``local_addr``, ``config``).
Imports the base modules, ``node.hostinfo`` and ``cli/`` (the conf table, the etcd flags' rules).
"""

from __future__ import annotations

import argparse
import datetime

from .. import logs
from ..cli import rdzv_conf
from ..config import (DEFAULT_ROOT, NO_RESTART_LIMIT, TORCHRUN_CLOSE_TIMEOUT, TORCHRUN_NPROC, TORCHRUN_STOP_TIMEOUT,
                      TORCHRUN_STORE_TIMEOUT, AgentConfig, EtcdConfig, JobSpec, Timings, WorkerConfig, default_address)
from ..errors import ConfigError
from ..node.hostinfo import default_node_id

log = logs.get("etcd_agent.torchrun")
BACKEND = "etcd-v3"


class BackendSettings:
    """What ``--rdzv-conf`` and torch's parameters make: the agent's config plus the handler's own timeouts."""

    def __init__(self, cfg: AgentConfig, store_timeout: datetime.timedelta, close_timeout: float):
        self.cfg = cfg
        self.store_timeout = store_timeout
        self.close_timeout = close_timeout


def settings(params) -> BackendSettings:
    """The backend's settings from torch's parameters; ConfigError names the ``--rdzv-*`` flag or conf key."""
    from ..cli.launch import etcd_config

    conf = rdzv_conf.read(params.config, rdzv_conf.TORCHRUN, unknown="error")
    for note in conf.notes:
        log.info("%s", note)
    if not params.endpoint:
        raise ConfigError(f"--rdzv-endpoint: the {BACKEND} backend needs the etcd endpoints, HOST:PORT[,HOST:PORT]")
    rdzv_conf.check_protocol(conf, False)
    got = conf.values.get
    lease_ttl = got("lease_ttl", Timings.lease_ttl)
    if "keep_alive" in conf.given.get("lease_ttl", ""):
        log.info("lease TTL %d s from torch's keep_alive_interval x keep_alive_max_attempt", lease_ttl)
    ns = argparse.Namespace(cacert=got("cacert"), cert=got("cert"), key=got("key"), user=got("user"),
                            password_file=got("password_file"),
                            etcd_timeout=got("etcd_timeout") or EtcdConfig.connect_timeout)
    etcd = etcd_config(ns, params.endpoint, "--rdzv-endpoint", lease_ttl=lease_ttl)
    run_id = str(params.run_id)
    root = got("root", DEFAULT_ROOT)
    if run_id == "none":
        log.warning("--rdzv-id is not set: torchrun's default run id 'none' is shared by every job under %s", root)
    cfg = AgentConfig(
        run_id=run_id, node_id=got("node_id") or default_node_id(),
        spec=JobSpec(params.min_nodes, params.max_nodes, TORCHRUN_NPROC, got("max_restarts", NO_RESTART_LIMIT)),
        # torch's agent runs the workers; the agent here only needs a group of one "worker" per node to track
        workers=WorkerConfig(entrypoint="torchrun", args=(), nproc=1, stop_timeout=TORCHRUN_STOP_TIMEOUT),
        etcd=etcd, root=root, local_addr=params.local_addr or default_address(), lease_ttl=lease_ttl,
        last_call=got("last_call", Timings.last_call), join_timeout=got("join_timeout", Timings.join_timeout),
        scale_settle=got("scale_settle", Timings.scale_settle))
    store_timeout = datetime.timedelta(seconds=got("store_timeout", TORCHRUN_STORE_TIMEOUT))
    return BackendSettings(cfg, store_timeout, got("close_timeout", TORCHRUN_CLOSE_TIMEOUT))
