"""The ``etcd-v3`` entry point from a fresh (non-editable) install of the package, and the import boundaries: the
agent never imports torch, and the entry point module that torch loads on every torchrun imports nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python(code: str, *, path: list[str] | None = None, timeout: float = 120) -> dict:
    """Run ``code`` in a fresh interpreter (``path`` first on sys.path); it prints one JSON object."""
    prefix = f"import sys; sys.path[:0] = {path!r}\n" if path else ""
    out = subprocess.run([sys.executable, "-c", prefix + code], capture_output=True, text=True, timeout=timeout,
                         cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_agent_never_imports_torch():
    got = python("import json, sys\n"
                 "import etcd_agent.cli.main, etcd_agent.agent, etcd_agent.coord.coordinator, etcd_agent.ops.status\n"
                 "print(json.dumps({'torch': sorted(m for m in sys.modules if m.split('.')[0] == 'torch')}))")
    assert got == {"torch": []}


def test_the_entry_point_module_imports_nothing():
    got = python("import json, sys\nimport etcd_agent.torch as p\n"
                 "creator = p.entry_point()\n"
                 "heavy = [m for m in ('torch', 'grpc', 'etcd3', 'etcd_agent.torch.rendezvous') if m in sys.modules]\n"
                 "print(json.dumps({'heavy': heavy, 'callable': callable(creator)}))")
    assert got == {"heavy": [], "callable": True}


@pytest.mark.torch
def test_entry_point_is_found_from_a_fresh_install(tmp_path):
    pytest.importorskip("torch")
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(wheels.glob("etcd_agent-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    got = python(
        "import json\nfrom importlib.metadata import distributions\n"
        f"dist = next(d for d in distributions(path=[{str(target)!r}]) if d.name == 'etcd-agent')\n"
        "eps = [(e.name, e.value) for e in dist.entry_points if e.group == 'torchrun.handlers']\n"
        "import etcd_agent\n"
        "from torch.distributed.elastic.rendezvous import rendezvous_handler_registry as registry\n"
        "from torch.distributed.elastic.rendezvous import RendezvousParameters\n"
        "h = registry.create_handler(RendezvousParameters('etcd-v3', '127.0.0.1:2379', 'job', 1, 2))\n"
        "print(json.dumps({'eps': eps, 'from': etcd_agent.__file__, 'backend': h.get_backend(),\n"
        "                  'type': type(h).__name__}))", path=[str(target)])
    assert got["eps"] == [["etcd-v3", "etcd_agent.torch:entry_point"]]
    assert got["from"].startswith(str(target))  # the fresh install, not the checkout
    assert got["backend"] == "etcd-v3" and got["type"] == "EtcdV3RendezvousHandler"


def _imports(path: Path) -> list[str]:
    """Every module a file imports at any level (relative imports resolved against the package)."""
    import ast

    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)  # a package's own file ends in __init__
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:-node.level]
                base = ".".join(parent + ([base] if base else []))
            found += [base] + [f"{base}.{a.name}" for a in node.names]
    return found


def test_import_direction():
    """torch is imported only under ``etcd_agent/torch/``, and nothing else in the package imports that."""
    for path in sorted((ROOT / "etcd_agent").rglob("*.py")):
        inside = path.parent.name == "torch"
        for name in _imports(path):
            top = name.split(".")[0]
            if not inside:
                assert top != "torch", f"{path.relative_to(ROOT)} imports {name}"
                assert not name.startswith("etcd_agent.torch"), f"{path.relative_to(ROOT)} imports {name}"
    # the entry point torch loads on every torchrun imports only the backend, and only when a handler is made
    assert set(_imports(ROOT / "etcd_agent" / "torch" / "__init__.py")) == {
        "__future__", "__future__.annotations", "etcd_agent.torch.rendezvous",
        "etcd_agent.torch.rendezvous.create_handler"}
