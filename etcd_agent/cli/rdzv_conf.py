"""``--rdzv-conf``: one table of its keys for its two readers, etcd-agent's own command line (``cli/launch.py``) and
torchrun's ``etcd-v3`` backend (``torch/settings.py``), and one rule from torch's keep-alive keys to the lease TTL.

Guarantees:
- A key sets one setting, named as the launcher's flag destination (``etcd_prefix`` sets ``root``), and means the
  same to both readers, but where the table gives it a reader: torch's ``timeout`` is the join timeout on etcd-agent's
  command line (torch's etcd backends' meaning) and the store's timeout under torchrun (which always sets it), and
  ``close_timeout`` is read by the backend only; the options about workers are the launcher's alone (under torchrun,
  torch's agent runs the workers).
- Every value is converted and checked here: a number of seconds (0 or more), a whole number (0 or more), an
  existing file, a non-empty text. A bad one is a ConfigError naming the key and the value; so is one setting given
  under two of its names with two values, and a password (``etcd_password``: the command line is visible to every
  user of the host).
- Keys torch uses and etcd-agent does not need are accepted, each with a note saying why (``NOT_NEEDED``). A key
  the reader does not know is a note (``unknown="warn"``: the launcher, as torchrun ignores keys it does not use) or
  a ConfigError listing the known keys (``unknown="error"``: the backend).
- ``keep_alive_interval`` x ``keep_alive_max_attempt`` set the lease TTL by one rule, ``lease_ttl_for``; given with
  ``lease_ttl`` (or ``--lease-ttl``) the two must agree.

Imports ``config`` and ``errors`` only; never torch or etcd.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping

from ..config import (MIN_LEASE_TTL, TORCHRUN_CLOSE_TIMEOUT, TORCHRUN_STORE_TIMEOUT, EtcdConfig, QuarantinePolicy,
                      Timings, WorkerConfig)
from ..errors import ConfigError

LAUNCH, TORCHRUN = "etcd-agent's command line", "the etcd-v3 backend"  # the readers
BOTH = (LAUNCH, TORCHRUN)
SECONDS, COUNT, FILE, TEXT = "seconds", "count", "file", "text"  # how a key's value is read
FRACTION = "fraction"  # a number from 0 to below 1
KEEP_ALIVE = ("keep_alive_interval", "keep_alive_max_attempt")
TORCH_KEEP_ALIVE = (5.0, 3)  # torch's defaults for them: a node is dead after 3 missed heartbeats 5 s apart
PASSWORD_KEY = "etcd_password"


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    sets: str  # the setting: the launcher's flag destination
    kind: str
    help: str
    readers: tuple[str, ...] = BOTH


def _keys() -> tuple[Key, ...]:
    t, w, q = Timings, WorkerConfig, QuarantinePolicy
    launch = (LAUNCH,)
    return (
        Key("join_timeout", "join_timeout", SECONDS, f"seconds a round may take to form (default {t.join_timeout:g})"),
        Key("timeout", "join_timeout", SECONDS, "torch's etcd backends' name for join_timeout", launch),
        Key("timeout", "store_timeout", SECONDS, "the store's get and wait timeout (torchrun sets 900; default "
            f"{TORCHRUN_STORE_TIMEOUT:g})", (TORCHRUN,)),
        Key("last_call_timeout", "last_call", SECONDS, f"wait for more nodes past MIN (default {t.last_call:g})"),
        Key("last_call", "last_call", SECONDS, "the same as last_call_timeout"),
        Key("close_timeout", "close_timeout", SECONDS, "how long shutdown waits for the job's end to be recorded "
            f"(default {TORCHRUN_CLOSE_TIMEOUT:g})", (TORCHRUN,)),
        Key("lease_ttl", "lease_ttl", COUNT, f"seconds a silent node keeps its lease (default {t.lease_ttl})"),
        Key("keep_alive_interval", "keep_alive_interval", SECONDS, "torch's heartbeat period: sets lease_ttl"),
        Key("keep_alive_max_attempt", "keep_alive_max_attempt", COUNT, "torch's missed heartbeats: sets lease_ttl"),
        Key("scale_settle", "scale_settle", SECONDS, f"batch new nodes before scaling up (default {t.scale_settle:g})"),
        Key("max_restarts", "max_restarts", COUNT, "a job-wide restart budget counted in etcd"),
        Key("node_id", "node_id", TEXT, "this node's id in etcd (default: host name plus a random suffix)"),
        Key("etcd_prefix", "root", TEXT, "the root of the job's keys in etcd"),
        *(Key(name, "cacert", FILE, "CA bundle: talk TLS to etcd") for name in ("etcd_cacert", "cacert", "ca_cert")),
        *(Key(name, "cert", FILE, "client certificate (mutual TLS)") for name in ("etcd_cert", "cert", "ssl_cert")),
        *(Key(name, "key", FILE, "client key (mutual TLS)") for name in ("etcd_key", "key", "ssl_cert_key")),
        Key("etcd_user", "user", TEXT, "etcd user (TLS only); the password comes from etcd_password_file or "
            "$ETCD_AGENT_ETCD_PASSWORD"),
        Key("etcd_password_file", "password_file", FILE, "file holding the etcd user's password (its first line)"),
        Key("protocol", "protocol", TEXT, "http or https (https needs etcd_cacert)"),
        Key("etcd_timeout", "etcd_timeout", SECONDS, "how long the first contact with etcd may take (default "
            f"{EtcdConfig.connect_timeout:g})"),
        # etcd-agent's launcher only: under torchrun, torch's agent runs the workers
        Key("worker_timeout", "worker_timeout", SECONDS, "restart on a worker without progress (0: off)", launch),
        Key("max_no_progress_restarts", "max_no_progress_restarts", COUNT, "end the job after this many restarts in a "
            "row without a new training step (0: off)", launch),
        Key("straggler_threshold", "straggler_threshold", FRACTION, "name nodes this fraction below the median step "
            "rate (0: off)", launch),
        Key("stop_timeout", "stop_timeout", SECONDS, f"workers' stop grace (default {w.stop_timeout:g})", launch),
        Key("health_check", "health_check", TEXT, "a command run before each join", launch),
        Key("health_check_timeout", "health_check_timeout", SECONDS, "how long the health check may take", launch),
        Key("gpu_drain_timeout", "gpu_drain_timeout", SECONDS, "how long stopped workers' GPU memory may take to "
            "be released", launch),
        Key("quarantine_after", "quarantine_after", COUNT, "worker failures that make the node sit out", launch),
        Key("quarantine_window", "quarantine_window", SECONDS, f"(default {q.window:g})", launch),
        Key("quarantine_cooldown", "quarantine_cooldown", SECONDS, f"(default {q.cooldown:g})", launch),
        Key("preload", "preload", TEXT, "--warm-restart: the modules the pre-started interpreters import", launch),
    )


KEYS = _keys()
# torch's keys that etcd-agent accepts and does not need, with the reason (a note each); a reader's own key wins.
NOT_NEEDED = {
    "close_timeout": "a round closes in one etcd txn",
    "read_timeout": "there is no c10d store to read from; etcd requests have their own timeout",
    "heartbeat_timeout": "liveness is the etcd lease (lease_ttl, or keep_alive_interval x keep_alive_max_attempt)",
    "is_host": "the rendezvous lives in etcd, not in a store one node hosts",
    "use_libuv": "there is no c10d store",
    "store_type": "there is no c10d store",
    "rank": "use --node-rank",
}


def keys_for(reader: str) -> dict[str, Key]:
    """The keys ``reader`` reads, by name."""
    return {k.name: k for k in KEYS if reader in k.readers}


def lease_ttl_for(interval: float | None, attempts: int | None) -> int:
    """The lease TTL for torch's keep-alive keys (a missing one takes torch's default): torch counts a node dead
    after ``attempts`` missed heartbeats ``interval`` s apart, so the TTL is their product, rounded up to whole
    seconds (etcd's TTLs are) and at least etcd's minimum TTL."""
    interval = TORCH_KEEP_ALIVE[0] if interval is None else interval
    attempts = TORCH_KEEP_ALIVE[1] if attempts is None else attempts
    return max(MIN_LEASE_TTL, math.ceil(round(interval * attempts, 6)))  # 0.1 x 30 is 3 s, not 3.0000000000000004


def parse(text: str, source: str = "--rdzv-conf") -> dict[str, str]:
    """``KEY=VALUE,...`` as torchrun parses it (keys and values stripped, both required); dashes in keys read as _."""
    out: dict[str, str] = {}
    for item in (text or "").strip().split(",") if (text or "").strip() else []:
        key, eq, value = item.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if not key or not eq or not value:
            raise ConfigError(f"{source} {text!r}: expected KEY=VALUE[,KEY=VALUE...], got {item.strip()!r}")
        out[key] = value
    return out


@dataclasses.dataclass
class Conf:
    """What ``read`` made of a ``--rdzv-conf``: setting -> value, setting -> the key that gave it, and notes."""

    values: dict[str, object] = dataclasses.field(default_factory=dict)
    given: dict[str, str] = dataclasses.field(default_factory=dict)  # setting -> "--rdzv-conf KEY"
    notes: list[str] = dataclasses.field(default_factory=list)

    def set(self, setting: str, value, where: str) -> None:
        if setting in self.values and self.values[setting] != value:
            raise ConfigError(f"{self.given[setting]}={self.values[setting]!r} and {where}={value!r} set the same "
                              "thing (given twice, with two values); give one")
        self.values.setdefault(setting, value)
        self.given.setdefault(setting, where)


def read(items: Mapping[str, object], reader: str, unknown: str, source: str = "--rdzv-conf") -> Conf:
    """The settings ``items`` (key -> raw value) make for ``reader``; ``unknown`` is ``"warn"`` or ``"error"``."""
    table, conf = keys_for(reader), Conf()
    for key, raw in items.items():
        if key == PASSWORD_KEY:
            raise ConfigError(f"{source} {PASSWORD_KEY}: a password on the command line is visible to every user of "
                              "the host; put it in $ETCD_AGENT_ETCD_PASSWORD or a file (etcd_password_file)")
        if key in table:
            conf.set(table[key].sets, _value(key, raw, table[key].kind, source), f"{source} {key}")
        elif key in NOT_NEEDED:
            conf.notes.append(f"{source}: {key}={raw} is accepted and not needed: {NOT_NEEDED[key]}")
        elif unknown == "error":
            raise ConfigError(_unknown(key, reader, f"known: {', '.join(sorted(table))}", source))
        else:
            conf.notes.append(f"{_unknown(key, reader, 'see docs/flags.md', source)}; it is ignored")
    keep_alive = [conf.values.pop(k, None) for k in KEEP_ALIVE]
    if keep_alive != [None, None]:
        if 0 in keep_alive:
            raise ConfigError(f"{source}: keep_alive_interval and keep_alive_max_attempt must be positive")
        named = [k for k, v in zip(KEEP_ALIVE, keep_alive) if v is not None and conf.given.pop(k)]
        conf.set("lease_ttl", lease_ttl_for(*keep_alive), f"{source} {' x '.join(named)}")
    protocol = conf.values.get("protocol")
    if protocol is not None and str(protocol).lower() not in ("http", "https"):
        raise ConfigError(f"{source} protocol={protocol}: expected http or https")
    return conf


def check_protocol(conf: Conf, has_ca: bool, other: str = "", source: str = "--rdzv-conf") -> None:
    """``protocol=https`` needs a CA: ``etcd_cacert`` (or one of its names) in the conf, or ``other`` (a flag)."""
    if str(conf.values.get("protocol", "http")).lower() == "https" and not (has_ca or "cacert" in conf.values):
        also = f" (or {other})" if other else ""
        raise ConfigError(f"{source} protocol=https needs etcd_cacert=FILE{also}: the CA that signed etcd's "
                          "certificate")


def _unknown(key: str, reader: str, known: str, source: str) -> str:
    others = [k for k in KEYS if k.name == key]
    if others:
        return f"{source} {key}: not read by {reader}, only by {others[0].readers[0]} ({others[0].help})"
    return f"{source} {key}: not a key {reader} knows ({known})"


def _value(key: str, raw, kind: str, source: str):
    text = str(raw).strip()
    where = f"{source} {key}={raw}"
    try:
        if kind == SECONDS:
            value = float(text)
            if not value >= 0:  # also NaN
                raise ValueError
            return value
        if kind == COUNT:
            value = int(text)
            if value < 0:
                raise ValueError
            return value
        if kind == FRACTION:
            value = float(text)
            if not 0 <= value < 1:  # also NaN
                raise ValueError
            return value
    except ValueError:
        expected = {SECONDS: "a number of seconds, 0 or more", FRACTION: "a fraction from 0 to below 1"}.get(
            kind, "a whole number, 0 or more")
        raise ConfigError(f"{where}: expected {expected}") from None
    if kind == FILE and not os.path.isfile(text):
        raise ConfigError(f"{where}: no such file: {text}")
    if not text:
        raise ConfigError(f"{where}: must not be empty")
    return text
