"""``etcd-agent doctor [a launch's flags] script.py [args]``: the preflight check an operator runs on a node before
a launch. The command line resolves exactly as a launch's does (``launch.resolve``); doctor prints what the launch
would use, then one line per check: ``ok`` with the fact, ``warn`` or ``FAIL`` with the fix (``skip``: not checked,
and why). The checks are ``preflight_etcd`` (etcd, the clock, the run id) and ``preflight`` (this node).

Guarantees: nothing is started (no etcd, no rendezvous, no workers) and nothing is written to etcd. The checks run
side by side with short deadlines, so a healthy node answers in well under a second and an unreachable etcd costs
about ``preflight_etcd.ETCD_CHECK_S``, never the launch's ``--etcd-timeout``. Exit codes: 0 when no check failed
(warnings allowed), 1 when one did, 2 for a flag error (the same one line a launch gives).

Imports the base modules and ``cli/`` (flags, launch, preflight, preflight_etcd); never the agent or torch.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shlex
import sys
import textwrap
from typing import Callable

from .. import __version__
from ..config import AgentConfig
from ..errors import EXIT_JOB_FAILED, EXIT_OK
from . import flags, preflight, preflight_etcd
from .launch import Launch, resolve
from .preflight import Check, Level

DESCRIPTION = ("Check this node before a launch: give the launch's own flags and script. Prints what the launch "
               "would use and one line per check (ok, warn, FAIL with the fix); starts nothing and writes nothing "
               "to etcd. Exit 0 when no check failed, 1 when one did, 2 for a flag error.")


def _parser() -> argparse.ArgumentParser:
    """A launch's parser (its errors one line, as a launch's are), introduced as doctor."""
    parser = flags.build_parser(__version__)
    parser.prog, parser.description, parser.epilog = "etcd-agent doctor", textwrap.fill(DESCRIPTION, 100), None
    parser.usage = "%(prog)s [a launch's flags] training_script [training script args ...]"
    return parser


def _etcd_flag(given: dict[str, str]) -> str:
    """The flag the etcd endpoints came from, for the fixes."""
    return given.get("endpoints") or given.get("rdzv_endpoint") or "--etcd-endpoints"


def _etcd_line(launch: Launch) -> str:
    cfg = launch.cfg
    if launch.embedded:
        return "embedded etcd (a one-node job: a private etcd on free loopback ports, removed on exit)"
    where = ", ".join(preflight_etcd.label(h, p) for h, p in cfg.etcd.endpoints)
    if launch.serve is not None:
        return (f"{where}, the job's own etcd (--rdzv-backend c10d: the agent that can bind it serves it), over "
                f"{cfg.etcd.describe()}")
    return f"{where}, over {cfg.etcd.describe()}"


def summary(launch: Launch, version: str, given: dict[str, str], accelerators: Check | None) -> list[str]:
    """What a launch here would use (``accelerators``: the check of what ``--nproc-per-node`` counts)."""
    cfg: AgentConfig = launch.cfg
    w, spec = cfg.workers, cfg.spec
    nproc = f"{w.nproc}" if spec.nproc_per_node.isdigit() else f"{w.nproc} (--nproc-per-node {spec.nproc_per_node})"
    if accelerators is not None and accelerators.level == Level.FAIL:
        nproc = f"none: --nproc-per-node {spec.nproc_per_node} finds no device here"
    node = cfg.node_id if "node_id" in given else f"{cfg.node_id} (a new suffix each start; --node-id pins it)"
    address = cfg.address if cfg.local_addr else f"{cfg.address} (this host's name; --local-addr sets it)"
    python = w.command()[0]
    interpreter = "none: --no-python" if w.no_python else f"{python} (Python {version or 'unknown: it did not run'})"
    rows = [("run id", cfg.run_id), ("etcd", _etcd_line(launch)),
            ("nodes", f"{spec.min_nodes}:{spec.max_nodes}" + (" (one node)" if spec.max_nodes == 1 else "")),
            ("workers per node", nproc), ("node id", node), ("local address", address),
            ("worker command", shlex.join(w.command())), ("interpreter", interpreter)]
    rows += [("note", note) for note in launch.notes]
    return ["a launch here would use:"] + [f"  {k:<17} {v}" for k, v in rows]


def run_checks(launch: Launch, given: dict[str, str]) -> tuple[str, Check | None, list[Check]]:
    """``(the workers' Python version, the accelerator check, every check in report order)``: the interpreter probe
    and the etcd checks run while this thread checks the node."""
    cfg = launch.cfg
    probe = preflight.start_probe(cfg.workers)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        on_etcd = pool.submit(preflight_etcd.checks, cfg, launch.embedded, launch.serve, _etcd_flag(given))
        node = [preflight.local_address(cfg), *preflight.master_port(cfg), preflight.entrypoint(cfg.workers)]
        gpus = preflight.accelerators(cfg)
        version, torch = preflight.interpreter(cfg.workers, probe)
        return version, gpus, on_etcd.result() + node + [torch] + ([gpus] if gpus else [])


def verdict(checks: list[Check]) -> tuple[int, str]:
    failed = sum(c.level == Level.FAIL for c in checks)
    warned = sum(c.level == Level.WARN for c in checks)
    warnings = f"{warned} warning{'s' if warned != 1 else ''}"
    if failed:
        return EXIT_JOB_FAILED, f"{failed} check{'s' if failed != 1 else ''} failed, {warnings}: fix the FAIL lines " \
                                "before launching"
    return EXIT_OK, f"ready to launch: no check failed, {warnings}"


def run_doctor(argv: list[str], setup_logging: Callable[[str, str], None]) -> int:
    parser = _parser()
    ns = parser.parse_args(argv)
    given = flags.sources(parser, ns)
    setup_logging(ns.log_level if "log_level" in given else "WARNING", ns.log_format)  # the report is the output
    launch = resolve(parser, ns, preflight=True)
    version, gpus, checks = run_checks(launch, given)
    code, last = verdict(checks)
    print("\n".join(summary(launch, version, given, gpus) + ["checks:"] + [c.line() for c in checks] + [last]),
          file=sys.stdout, flush=True)
    return code
