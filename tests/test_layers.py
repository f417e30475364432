"""The layers of DESIGN section 8, checked over the AST of every module of the package (function-level imports
included): one table of the directions allowed, plus the third-party imports each layer may make."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "etcd_agent"

# The base modules: frozen records, errors, the log format, secrets, process trees, the worker heartbeat.
# metrics: this agent's Prometheus metrics, whose hooks every layer calls (no-ops unless --metrics-port is given).
BASE = {"__init__", "errors", "logs", "secure", "config", "endpoints", "progress", "proctree", "metrics"}
LAYERS_BELOW = {
    "base": set(),
    "schema": {"base"},
    "etcd": {"base", "schema"},
    "coord": {"base", "schema", "etcd"},  # never node/
    "node": {"base", "schema"},  # never etcd/ or coord/
    "agent": {"base", "schema", "etcd", "coord", "node"},  # the one module that combines coord/ and node/
    "ops": {"base", "schema", "etcd", "coord"},
    "cli": {"base", "schema", "etcd", "coord", "node", "agent", "ops"},
    "torch": {"base", "schema", "etcd", "coord", "node", "agent", "cli"},
    # for tests and tools (embedded clusters; the simulation: real agents, stand-in workers); nothing imports it
    "testing": {"base", "schema", "etcd", "coord", "node", "agent", "cli"},  # the simulation resolves command lines
}
# Third-party packages a layer alone may import (every other layer: none of them).
# matplotlib: events --plot; prometheus_client: the agent's metrics (base: metrics.py) and the exporter (ops/)
ONLY_IN = {"etcd3": {"etcd"}, "grpc": {"etcd"}, "torch": {"torch"}, "matplotlib": {"ops"},
           "prometheus_client": {"base", "ops"}}
EXCEPTIONS: set[tuple[str, str]] = set()  # (module, imported module) pairs that break the table, each with its reason


def layer(module: str) -> str:
    """``etcd_agent.coord.txns`` -> ``coord``; the top-level modules are ``base``, but ``agent`` and the
    ``python -m`` entry (which runs the command line)."""
    parts = module.split(".")[1:]
    if len(parts) > 1 or parts and (PACKAGE / parts[0]).is_dir():
        return parts[0]
    name = parts[0] if parts else "__init__"
    if name == "__main__":
        return "cli"
    if name == "agent":
        return "agent"
    assert name in BASE, f"etcd_agent.{name} is in no layer: add it to BASE or move it into a subpackage"
    return "base"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[str]:
    """Every module the file imports, at any depth, as absolute names (``from x import y`` gives x.y when y is a
    module, else x)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    ROOT / Path(*sub.split("."))).is_dir()
                found.append(sub if base.startswith("etcd_agent") and is_module else base)
    return found


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer():
    assert modules()
    for path in modules():
        assert layer(module_name(path)) in LAYERS_BELOW


def test_imports_point_down_the_layers():
    wrong = []
    for path in modules():
        here = module_name(path)
        mine = layer(here)
        for name in imports(path):
            if name == "etcd_agent" or not name.startswith("etcd_agent."):
                continue
            theirs = layer(name)
            if theirs != mine and theirs not in LAYERS_BELOW[mine] and (here, name) not in EXCEPTIONS:
                wrong.append(f"{here} ({mine}) imports {name} ({theirs})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_coord_and_node_never_import_each_other():
    assert "node" not in LAYERS_BELOW["coord"] and "coord" not in LAYERS_BELOW["node"]
    assert not any("testing" in below for below in LAYERS_BELOW.values())
    assert not any("torch" in below for name, below in LAYERS_BELOW.items())


def test_third_party_imports_stay_in_their_layer():
    wrong = []
    for path in modules():
        here = module_name(path)
        for name in imports(path):
            owners = ONLY_IN.get(name.split(".")[0])
            if owners and layer(here) not in owners:
                wrong.append(f"{here} imports {name} (only {', '.join(sorted(owners))} may)")
    assert not wrong, "\n".join(wrong)


def test_the_scan_sees_lazy_imports(tmp_path):
    """A function-level import counts: the scan walks the whole tree, not the module's top."""
    found = imports(PACKAGE / "cli" / "main.py")
    assert "etcd_agent.agent" in found  # imported inside main()
