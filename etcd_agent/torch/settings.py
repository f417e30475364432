"""``--rdzv-conf`` of torchrun's ``etcd-v3`` backend: torch's keys and the agent's options, checked, into the
agent's config. A key the backend does not know, a bad value, a key given twice under two of its names or a
password on the command line is a ConfigError naming the key. Imports no torch: torch's parameters are read by
their attributes (``endpoint``, ``run_id``, ``min_nodes``, ``max_nodes``, ``local_addr``, ``config``).
"""

from __future__ import annotations

import argparse
import datetime
import os

from .. import logs
from ..config import (DEFAULT_ROOT, NO_RESTART_LIMIT, TORCHRUN_NPROC, AgentConfig, JobSpec, WorkerConfig,
                      default_address, default_node_id)
from ..errors import ConfigError

log = logs.get("etcd_agent.torchrun")
BACKEND = "etcd-v3"

# --rdzv-conf: key -> (kind, what it sets). Aliases are torch's names for the same thing.
RDZV_CONF = {
    "join_timeout": ("seconds", "how long a round may take to form before the job fails (default 600)"),
    "last_call_timeout": ("seconds", "wait for more nodes once MIN joined, before closing a round (default 3)"),
    "last_call": ("seconds", "the same as last_call_timeout"),
    "close_timeout": ("seconds", "how long shutdown waits for the job's end to be recorded (default 30)"),
    "timeout": ("seconds", "the default timeout of the rendezvous store's get and wait (torchrun sets 900)"),
    "lease_ttl": ("int", "seconds of the node's etcd lease: a node silent that long is lost (default 5)"),
    "keep_alive_interval": ("int", "torch's heartbeat period; with keep_alive_max_attempt it sets lease_ttl"),
    "keep_alive_max_attempt": ("int", "torch's missed heartbeats; lease_ttl = interval x attempts if not given"),
    "scale_settle": ("seconds", "wait after a new node registers before the job scales up (default 1)"),
    "max_restarts": ("int", "a job-wide restart budget counted in etcd (default: none beyond torchrun's own)"),
    "node_id": ("str", "this node's id in etcd (default: host name plus a random suffix)"),
    "etcd_prefix": ("str", f"the root of the job's keys in etcd (default {DEFAULT_ROOT})"),
    "etcd_cacert": ("file", "CA bundle: talk TLS to etcd"), "cacert": ("file", "torch's name for etcd_cacert"),
    "ca_cert": ("file", "torch's name for etcd_cacert"),
    "etcd_cert": ("file", "client certificate (mutual TLS)"), "cert": ("file", "torch's name for etcd_cert"),
    "ssl_cert": ("file", "torch's name for etcd_cert"),
    "etcd_key": ("file", "client key (mutual TLS)"), "key": ("file", "torch's name for etcd_key"),
    "ssl_cert_key": ("file", "torch's name for etcd_key"),
    "etcd_user": ("str", "etcd user (TLS only); the password comes from etcd_password_file or "
                         "$ETCD_AGENT_ETCD_PASSWORD"),
    "etcd_password_file": ("file", "file holding the etcd user's password (its first line)"),
    "protocol": ("str", "http or https (https needs etcd_cacert)"),
    "etcd_timeout": ("seconds", "how long the first contact with etcd may take (default 10)"),
    # torch's c10d backend's own keys: accepted, nothing to do here
    "read_timeout": ("unused", "no TCPStore to read from: the rendezvous state lives in etcd"),
    "heartbeat_timeout": ("unused", "liveness is the etcd lease: see lease_ttl"),
    "is_host": ("unused", "no node hosts the rendezvous: etcd does"),
    "store_type": ("unused", "the rendezvous store is always etcd"),
    "use_libuv": ("unused", "the rendezvous store is etcd, not a TCPStore"),
}
_ALIASES = {"last_call": "last_call_timeout", "cacert": "etcd_cacert", "ca_cert": "etcd_cacert",
            "cert": "etcd_cert", "ssl_cert": "etcd_cert", "key": "etcd_key", "ssl_cert_key": "etcd_key"}


class BackendSettings:
    """What ``--rdzv-conf`` and torch's parameters make: the agent's config plus the handler's own timeouts."""

    def __init__(self, cfg: AgentConfig, store_timeout: datetime.timedelta, close_timeout: float):
        self.cfg = cfg
        self.store_timeout = store_timeout
        self.close_timeout = close_timeout


def _value(key: str, raw, kind: str):
    text = str(raw).strip()
    where = f"--rdzv-conf {key}={raw}"
    try:
        if kind == "seconds":
            value = float(text)
            if not value >= 0:  # also NaN
                raise ValueError
            return value
        if kind == "int":
            value = int(text)
            if value < 0:
                raise ValueError
            return value
    except ValueError:
        expected = "a number of seconds, 0 or more" if kind == "seconds" else "a whole number, 0 or more"
        raise ConfigError(f"{where}: expected {expected}") from None
    if kind == "file":
        if not os.path.isfile(text):
            raise ConfigError(f"{where}: no such file: {text}")
        return text
    if not text:
        raise ConfigError(f"{where}: must not be empty")
    return text


def settings(params) -> BackendSettings:
    """The backend's settings from torch's parameters; ConfigError names the ``--rdzv-*`` flag or conf key."""
    from ..cli.flags import PASSWORD_ENV
    from ..cli.launch import etcd_config

    conf: dict = {}
    for key, raw in params.config.items():
        if key == "etcd_password":
            raise ConfigError(f"--rdzv-conf etcd_password: a password on the command line is visible to every "
                              f"user of the host; put it in ${PASSWORD_ENV}")
        if key not in RDZV_CONF:
            known = ", ".join(sorted(RDZV_CONF))
            raise ConfigError(f"--rdzv-conf {key}: not a key the {BACKEND} backend knows (known: {known})")
        kind = RDZV_CONF[key][0]
        if kind == "unused":
            log.info("--rdzv-conf %s is not used by the %s backend: %s", key, BACKEND, RDZV_CONF[key][1])
            continue
        name = _ALIASES.get(key, key)
        if name in conf:
            raise ConfigError(f"--rdzv-conf {key}: given twice (also as {name} or one of its aliases)")
        conf[name] = _value(key, raw, kind)
    if not params.endpoint:
        raise ConfigError(f"--rdzv-endpoint: the {BACKEND} backend needs the etcd endpoints, HOST:PORT[,HOST:PORT]")
    protocol = conf.get("protocol", "http").lower()
    if protocol not in ("http", "https"):
        raise ConfigError(f"--rdzv-conf protocol={protocol}: expected http or https")
    if protocol == "https" and "etcd_cacert" not in conf:
        raise ConfigError("--rdzv-conf protocol=https needs etcd_cacert=FILE (the CA that signed etcd's certificate)")
    lease_ttl = conf.get("lease_ttl")
    if lease_ttl is None and ("keep_alive_interval" in conf or "keep_alive_max_attempt" in conf):
        lease_ttl = max(2, conf.get("keep_alive_interval", 5) * conf.get("keep_alive_max_attempt", 3))
        log.info("lease TTL %d s from torch's keep_alive_interval x keep_alive_max_attempt", lease_ttl)
    lease_ttl = 5 if lease_ttl is None else lease_ttl
    ns = argparse.Namespace(cacert=conf.get("etcd_cacert"), cert=conf.get("etcd_cert"), key=conf.get("etcd_key"),
                            user=conf.get("etcd_user"), password_file=conf.get("etcd_password_file"),
                            etcd_timeout=conf.get("etcd_timeout", 10.0) or 10.0)
    etcd = etcd_config(ns, params.endpoint, "--rdzv-endpoint", lease_ttl=lease_ttl)
    run_id = str(params.run_id)
    if run_id == "none":
        log.warning("--rdzv-id is not set: torchrun's default run id 'none' is shared by every job under %s",
                    conf.get("etcd_prefix", DEFAULT_ROOT))
    cfg = AgentConfig(
        run_id=run_id, node_id=conf.get("node_id") or default_node_id(),
        spec=JobSpec(params.min_nodes, params.max_nodes, TORCHRUN_NPROC, conf.get("max_restarts", NO_RESTART_LIMIT)),
        # torch's agent runs the workers; the agent here only needs a group of one "worker" per node to track
        workers=WorkerConfig(entrypoint="torchrun", args=(), nproc=1, stop_timeout=30.0),
        etcd=etcd, root=conf.get("etcd_prefix", DEFAULT_ROOT), local_addr=params.local_addr or default_address(),
        lease_ttl=lease_ttl, last_call=conf.get("last_call_timeout", 3.0), join_timeout=conf.get("join_timeout", 600.0),
        scale_settle=conf.get("scale_settle", 1.0))
    store_timeout = datetime.timedelta(seconds=conf.get("timeout", 300.0))
    return BackendSettings(cfg, store_timeout, conf.get("close_timeout", 30.0))
