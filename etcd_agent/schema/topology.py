"""A node's topology path: where it sits in the network, as blocks from the outside in (``/spine2/leaf5``: switch
leaf5 under spine2). Nodes whose paths share a longer prefix share a deeper block (the same leaf switch, NVLink
domain or rack), and the plan gives them consecutive group ranks (``coord/ranks.py``).

A path is ``/`` (no topology: one block at the root, as a node that declares none) or ``/`` followed by 1 to
``MAX_DEPTH`` components separated by ``/``, each of letters, digits, ``.``, ``_``, ``-`` or ``:``, at most
``MAX_CHARS`` characters in all: it travels in the node's registry entry and in each plan entry that holds the
node, so its length is paid per member of every plan. It is stored without the root (``""``) or as given.

Pure: imports the standard library only.
"""

from __future__ import annotations

import functools
import re

MAX_DEPTH = 8  # components: a data centre, a hall, a row, a rack, spine and leaf switches, with room to spare
MAX_CHARS = 64  # the whole path: at 10,000 members a plan stays well under etcd's 1.5 MiB request limit
_COMPONENT = re.compile(r"[A-Za-z0-9._:-]+")
_RUNS = re.compile(r"(\d+)")


def parse(text: str) -> tuple[str, ...]:
    """The components of a path (``()`` for ``/`` or ``""``); ValueError says what is wrong with a bad one."""
    if not text or text == "/":
        return ()
    return _parse(text)


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> tuple[str, ...]:
    if not text.startswith("/"):
        raise ValueError("must start with '/' (a path of blocks such as /spine2/leaf5)")
    if len(text) > MAX_CHARS:
        raise ValueError(f"is {len(text)} characters long; at most {MAX_CHARS}")
    parts = tuple(text[1:].split("/"))
    if len(parts) > MAX_DEPTH:
        raise ValueError(f"has {len(parts)} components; at most {MAX_DEPTH}")
    for i, part in enumerate(parts, 1):
        if not part:
            raise ValueError(f"component {i} is empty (no '//' and no '/' at the end)")
        if any(c.isspace() for c in part):
            raise ValueError(f"component {i} ({part!r}) has a space in it")
        if not _COMPONENT.fullmatch(part):
            raise ValueError(f"component {i} ({part!r}) may hold only letters, digits, '.', '_', '-' and ':'")
    return parts


def normal(text: str) -> str:
    """The path as stored: ``""`` for the root, else as given (checked: ValueError when bad)."""
    return "/" + "/".join(parse(text)) if parse(text) else ""


def from_slurm(addr: str, pattern: str = "") -> str:
    """``SLURM_TOPOLOGY_ADDR`` as a path: Slurm writes the switches above the node and the node itself, joined by
    dots, outermost first (``s0.s3.node12``), and ``SLURM_TOPOLOGY_ADDR_PATTERN`` names each (``switch.switch.node``;
    ``node`` alone when there is no topology plugin). The node's own name is dropped: ``/s0/s3``. Without a pattern
    the last component is taken for the node."""
    parts = [p for p in addr.strip().split(".")]
    kinds = [k for k in pattern.strip().split(".")] if pattern.strip() else []
    switches = kinds.count("switch") if kinds else len(parts) - 1
    return "/" + "/".join(parts[:switches]) if switches > 0 else "/"


@functools.lru_cache(maxsize=4096)
def sort_key(parts: tuple[str, ...]) -> tuple:
    """Orders paths by component, numbers within a component by value (leaf2 before leaf10); two distinct
    components never compare equal, so each block stays contiguous in a sorted list."""
    return tuple((tuple((1, int(r)) if r.isdigit() else (0, r) for r in _RUNS.split(p) if r), p) for p in parts)


def shared(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """How many leading components two paths share: the depth of their deepest common block (0: the root)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
