"""Where this node sits in the network: ``--topology PATH``, ``--topology-file FILE`` or Slurm's
``$SLURM_TOPOLOGY_ADDR``, resolved into the path its registry entry carries (``schema/topology.py``), from which a
round's leader gives nodes that share a block consecutive group ranks (``coord/ranks.py``).

The sources, first match wins: ``--topology``; ``--topology-file`` (its first line: a site writes the file from its
inventory, its CMDB or its switch map, so that no launch line has to name the node's place); ``$SLURM_TOPOLOGY_ADDR``
with ``$SLURM_TOPOLOGY_ADDR_PATTERN`` (srun sets them for every task when Slurm has a topology plugin: the
switches above the node, outermost first; the node's own name is dropped). None of them: no topology (the root).
``--topology /`` says "none" and ignores Slurm's. A bad path is a ConfigError naming where it came from.

Imports ``errors``, ``schema.topology`` and ``cli.flags`` only.
"""

from __future__ import annotations

import argparse
import os

from ..errors import ConfigError
from ..schema import topology
from .flags import Store

SLURM_ADDR, SLURM_PATTERN = "SLURM_TOPOLOGY_ADDR", "SLURM_TOPOLOGY_ADDR_PATTERN"


def topology_flags(g) -> None:
    """``--topology`` and ``--topology-file``, in the agent's option group."""
    g.add_argument("--topology", action=Store, default=None, metavar="PATH",
                   help=f"this node's place in the network, outermost block first (/spine2/leaf5; at most "
                        f"{topology.MAX_DEPTH} components, {topology.MAX_CHARS} characters): nodes that share a "
                        f"deeper block get consecutive group ranks; / for none (default: --topology-file, else "
                        f"${SLURM_ADDR})")
    g.add_argument(*("--topology-file", "--topology_file"), dest="topology_file", action=Store, default=None,
                   metavar="FILE", help="a file whose first line is this node's --topology path, as a site writes "
                                        "it from its inventory")


def resolve(ns: argparse.Namespace, env=os.environ) -> str:
    """This node's topology path as stored ("" none), from the first source that gives one."""
    if ns.topology is not None and ns.topology_file is not None:
        raise ConfigError(f"--topology {ns.topology} and --topology-file {ns.topology_file}: give one of them")
    if ns.topology is not None:
        if not ns.topology:
            raise ConfigError("--topology is empty: give a path such as /spine2/leaf5, or / for none")
        return _checked(ns.topology, f"--topology {ns.topology!r}")
    if ns.topology_file is not None:
        try:
            with open(ns.topology_file, encoding="utf-8") as f:
                line = f.readline(topology.MAX_CHARS + 2).strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--topology-file {ns.topology_file}: cannot read it: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        if not line:
            raise ConfigError(f"--topology-file {ns.topology_file}: the file's first line is empty (write / for "
                              "none)")
        return _checked(line, f"--topology-file {ns.topology_file}: its path {line!r}")
    addr = env.get(SLURM_ADDR, "").strip()
    if addr:
        pattern = env.get(SLURM_PATTERN, "")
        return _checked(topology.from_slurm(addr, pattern),
                        f"${SLURM_ADDR} {addr!r} (${SLURM_PATTERN} {pattern!r}), as a --topology path:",
                        "; give --topology a path of your own, or / to ignore Slurm's")
    return ""


def _checked(text: str, source: str, fix: str = "") -> str:
    try:
        return topology.normal(text)
    except ValueError as exc:
        raise ConfigError(f"{source} {exc}{fix}") from None
