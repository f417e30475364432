"""Real torch workers (gloo on the CPU) under two agents: DDP training, all_reduce, and a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents import AgentProc, wait_all

pytest.importorskip("torch")
pytestmark = pytest.mark.torch
TRAIN = str(Path(__file__).parent.parent / "tools" / "demo" / "train.py")


@pytest.mark.parametrize("crash", [False, True], ids=["clean", "crash-once"])
def test_two_agents_train_with_gloo(crash, etcd_endpoint, run_id, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = ["--steps", "5", "--out", str(out)] + (["--crash-once"] if crash else [])
    agents = [AgentProc(etcd_endpoint, run_id, f"node-{i}", tmp_path, args, nnodes="2", nproc=2, entry=TRAIN,
                        extra=["--max-restarts", "1"]) for i in range(2)]
    assert wait_all(agents, timeout=120) == [0, 0], [a.stderr()[-3000:] for a in agents]
    results = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3]
    assert all(r["sum"] == 10.0 and r["world"] == 4 for r in results)
    assert {r["restarts"] for r in results} == {1 if crash else 0}
    assert len({tuple(r["master"]) for r in results}) == 1
