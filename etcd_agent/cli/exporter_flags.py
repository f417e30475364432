"""The flags ``etcd-agent exporter`` takes beyond the subcommands' etcd flags (``flags.subcommand_flags``).

``--run-id`` names the runs to export, comma-separated (default: every run under ``--etcd-prefix``); ``--listen``
where ``/metrics`` is served; ``--retention`` how long an ended job's run stays exported. The defaults are
``ops.exporter``'s, stated there once. Imports only ``cli.flags`` (and, for the defaults, ``ops.exporter``, which
imports prometheus_client only when the exporter runs).
"""

from __future__ import annotations

import argparse

from ..ops.exporter import DEFAULT_LISTEN, DEFAULT_RETENTION
from .flags import Store, log_flags


def exporter_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--listen", action=Store, default=DEFAULT_LISTEN,
                   help="HOST:PORT to serve /metrics on (default %(default)s; 0.0.0.0:9464 for every interface)")
    p.add_argument("--retention", type=float, action=Store, default=DEFAULT_RETENTION,
                   help="seconds an ended job's run stays in the metrics after its result (default %(default)g)")
    log_flags(p, "INFO", "log level on stderr")
    for action in p._actions:  # noqa: SLF001 - argparse has no public list of actions
        if action.dest == "run_id" and "--run-id" in action.option_strings:
            action.help = "the runs to export, comma-separated (default: every run under --etcd-prefix; env " \
                          "ETCD_AGENT_RUN_ID)"
    return p
