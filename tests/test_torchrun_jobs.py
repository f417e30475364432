"""Real torchrun processes on loopback with ``--rdzv-backend etcd-v3`` against the real etcd: gloo workers
all_reduce on 2, 3 and 4 nodes; a worker failure with ``--max-restarts 1`` restarts every node once; a spent
budget ends the job failed with its root cause; a killed node in ``--nnodes 2:3`` lets the survivors re-form; a
node that joins later scales the job up. The package is installed, so torch finds the backend through its
entry point, as a user's torchrun would."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from agents import STARTED, WORKERS, CommandLine, job_keys, keys_of, poll_until, wait_for_key
from etcd_agent.testing import records as record_files
from etcd_agent.testing.procs import kill_tree

pytest.importorskip("torch")
pytestmark = pytest.mark.torch
SCRIPT = str(WORKERS / "torch_allreduce.py")


class Torchrun(CommandLine):
    """``torchrun --rdzv-backend etcd-v3 ...`` for one node of a test job."""

    def __init__(self, endpoint: str, run_id: str, node: str, workdir: Path, nnodes: str, nproc: int,
                 worker_args: list[str], max_restarts: int = 0, conf: str = ""):
        conf = ",".join(filter(None, [f"node_id={node}", "last_call_timeout=1", "lease_ttl=3", conf]))
        super().__init__(["--rdzv-backend", "etcd-v3", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
                          "--nnodes", nnodes, "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
                          "--monitor-interval", "0.1", "--local-addr", "127.0.0.1", "--rdzv-conf", conf,
                          SCRIPT, "--out", str(workdir / "out"), *worker_args], workdir, node,
                         module="torch.distributed.run")

    def kill(self) -> None:
        """The whole node: torchrun and the workers it started (each in a session of its own)."""
        if not self.reaper.ended.is_set():
            kill_tree(self.proc.pid)
        super().kill()


def workers_of(t: Torchrun) -> list[psutil.Process]:
    """The worker processes torchrun started (its children running the test script)."""
    try:
        return [p for p in psutil.Process(t.proc.pid).children() if SCRIPT in p.cmdline()]
    except psutil.Error:
        return []


def start(n: int, endpoint: str, run_id: str, tmp_path: Path, nnodes: str, nproc: int, args: list[str],
          max_restarts: int = 0, conf: str = "", first: int = 0) -> list[Torchrun]:
    (tmp_path / "out").mkdir(exist_ok=True)
    return [Torchrun(endpoint, run_id, f"node{i}", tmp_path, nnodes, nproc, args, max_restarts, conf)
            for i in range(first, first + n)]


def finish(nodes: list[Torchrun], timeout: float = 150.0) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [t.wait(max(1.0, deadline - time.monotonic())) for t in nodes]
    finally:
        for t in nodes:
            t.kill()


def records(tmp_path: Path) -> list[dict]:
    return record_files.load(tmp_path / "out")


def logs(nodes: list[Torchrun]) -> str:
    return "\n".join(f"--- {t.node}\n{t.stderr()[-3000:]}" for t in nodes)


@pytest.fixture(autouse=True)
def _kill_trees():
    yield
    for t in STARTED:
        if isinstance(t, Torchrun):
            t.kill()


@pytest.mark.parametrize("n, nproc", [(2, 2), (3, 1), (4, 1)])
def test_gloo_all_reduce_on_n_nodes(n, nproc, etcd_endpoint, run_id, tmp_path):
    nodes = start(n, etcd_endpoint, run_id, tmp_path, str(n), nproc, [])
    assert finish(nodes) == [0] * n, logs(nodes)
    got = records(tmp_path)
    world = n * nproc
    assert sorted(r["rank"] for r in got) == list(range(world))
    assert {r["world"] for r in got} == {world}
    assert {r["sum"] for r in got} == {world * (world + 1) / 2}
    assert sorted({r["group_rank"] for r in got}) == list(range(n))
    assert len({tuple(r["master"]) for r in got}) == 1
    assert {r["use_agent_store"] for r in got} == {"False"}
    state = job_keys(etcd_endpoint, run_id)
    assert state[keys_of(run_id).result()]["outcome"] == "succeeded"
    assert not any(k.startswith(keys_of(run_id).nodes()) for k in state)  # every lease revoked at the end


def test_worker_failure_restarts_every_node_once(etcd_endpoint, run_id, tmp_path):
    nodes = start(2, etcd_endpoint, run_id, tmp_path, "2", 2, ["--crash-once", "3"], max_restarts=1)
    assert finish(nodes) == [0, 0], logs(nodes)
    got = records(tmp_path)
    assert sorted(r["rank"] for r in got) == [0, 1, 2, 3] and {r["world"] for r in got} == {4}
    # torch counts restarts per node: the failing node's agent restarted once, the other re-joined uncounted
    crashed = {r["group_rank"] for r in got if r["rank"] == 3}
    assert {r["restart_count"] for r in got if r["group_rank"] in crashed} == {1}
    keys = keys_of(run_id)
    state = job_keys(etcd_endpoint, run_id)
    assert state[keys.round()]["round"] == 2
    assert state[keys.restarts()]["used"] == 1
    assert state[keys.result()]["outcome"] == "succeeded"
    assert any(k.startswith(keys.failures(1)) for k in state)


def test_spent_restarts_end_the_job_failed_with_the_root_cause(etcd_endpoint, run_id, tmp_path):
    nodes = start(2, etcd_endpoint, run_id, tmp_path, "2", 1, ["--always-fail", "1"], max_restarts=1)
    codes = finish(nodes)
    assert all(c != 0 for c in codes), logs(nodes)
    result = job_keys(etcd_endpoint, run_id)[keys_of(run_id).result()]
    assert result["outcome"] == "failed"
    assert "restarts (--max-restarts) are spent" in result["reason"]
    assert result["root_cause"]["rank"] == 1 and result["root_cause"]["exitcode"] == 3
    # the other node's torchrun ends with the job's reason, not a hang or a gloo timeout
    assert any("RendezvousClosedError" in t.stderr() and "gave up" in t.stderr() for t in nodes), logs(nodes)


@pytest.mark.parametrize("how", [pytest.param("SIGKILL of the node", marks=pytest.mark.chaos), "SIGTERM to torchrun"])
def test_a_lost_node_lets_the_survivors_re_form(how, etcd_endpoint, run_id, tmp_path):
    nodes = start(3, etcd_endpoint, run_id, tmp_path, "2:3", 1, ["--while-world", "3"], max_restarts=3)
    keys = keys_of(run_id)
    plan = wait_for_key(etcd_endpoint, keys.plan(1), timeout=90)
    assert plan["group_world_size"] == 3
    poll_until(lambda: all(workers_of(t) for t in nodes), 60, "every node's worker of round 1 to run")
    victim = nodes[2]
    if how.startswith("SIGKILL"):
        victim.kill()  # torchrun and its workers: no chance to say goodbye; the lease runs out (lease_ttl=3)
    else:
        victim.proc.send_signal(signal.SIGTERM)  # torch stops its workers; the backend leaves as torchrun exits
        assert victim.proc.wait(90) != 0
        # node2's registration went with its lease, revoked as torchrun exited: gone at once, not a TTL later
        assert keys.node("node2") not in job_keys(etcd_endpoint, run_id)
    survivors = nodes[:2]
    assert finish(survivors) == [0, 0], logs(nodes)
    got = records(tmp_path)
    assert sorted(r["rank"] for r in got) == [0, 1] and {r["world"] for r in got} == {2}
    state = job_keys(etcd_endpoint, run_id)
    assert state[keys.result()]["outcome"] == "succeeded"
    assert state[keys.result()]["round"] >= 2


def test_a_late_node_scales_the_job_up(etcd_endpoint, run_id, tmp_path):
    conf = "scale_settle=0.5"
    nodes = start(2, etcd_endpoint, run_id, tmp_path, "2:3", 1, ["--until-world", "3"], max_restarts=0, conf=conf)
    keys = keys_of(run_id)
    plan = wait_for_key(etcd_endpoint, keys.plan(1), timeout=90)
    assert plan["group_world_size"] == 2
    nodes += start(1, etcd_endpoint, run_id, tmp_path, "2:3", 1, ["--until-world", "3"], conf=conf, first=2)
    assert finish(nodes) == [0, 0, 0], logs(nodes)
    got = records(tmp_path)
    assert sorted(r["rank"] for r in got) == [0, 1, 2] and {r["world"] for r in got} == {3}
    state = job_keys(etcd_endpoint, run_id)
    assert state[keys.restarts()]["used"] == 0  # a scale-up is not a restart (torch's --max-restarts 0 held)
    assert state[keys.result()]["outcome"] == "succeeded"
