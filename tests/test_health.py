"""The health gate's GPU side (health.py, gpu.py): NVML through a stand-in module (missing GPUs, pending
retirement, ECC errors; no NVML), --nproc-per-node gpu, the GPU memory drain after a stop, and NVML on a real GPU
where there is one. (Decisions and the command check: test_health_check.py; real jobs: test_health_jobs.py.)"""

from __future__ import annotations

import contextlib
import logging
import os
import queue

import pytest

from etcd_agent.config import HealthConfig
from etcd_agent.node import gpu, health


# --- NVML, through a stand-in of pynvml -------------------------------------------------------------------------

class FakeNVML:
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC = 1, 0

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: int, pending=(), ecc=None, unsupported=()):
        self.gpus, self.pending, self.ecc, self.unsupported = gpus, set(pending), dict(ecc or {}), set(unsupported)

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h):
        if h in self.unsupported:
            raise self.NVMLError("Not Supported")
        return 1 if h in self.pending else 0

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        assert (kind, counter) == (1, 0)
        if h in self.unsupported:
            raise self.NVMLError("Not Supported")
        return self.ecc.get(h, 0)


def test_nvml_reports_missing_gpus_pending_retirement_and_ecc_errors():
    assert gpu.problems(4, FakeNVML(4)) == []
    assert gpu.problems(4, FakeNVML(4, unsupported={0, 1, 2, 3})) == []  # a GPU without those counters is fine
    found = gpu.problems(4, FakeNVML(3, pending={1}, ecc={2: 5}))
    assert found == ["3 GPU(s) visible, 4 expected", "GPU 1 has memory pages waiting to be retired (it needs a reset)",
                     "GPU 2 has 5 uncorrectable ECC error(s) since the driver loaded"]
    gate = HealthConfig(gpus=4)
    assert health.check(gate, FakeNVML(3)) == "3 GPU(s) visible, 4 expected"
    assert health.check(gate, FakeNVML(4)) == ""


def test_without_nvml_the_gpu_check_is_skipped_and_says_so_once(caplog):
    gpu.forget()

    def missing():
        raise ImportError("No module named 'pynvml'")
    try:
        with caplog.at_level(logging.INFO, logger="etcd_agent.node.gpu"):
            assert gpu.nvml(missing) is None
            assert gpu.nvml(missing) is None and gpu.problems(8) is None and gpu.count() is None
        said = [r.getMessage() for r in caplog.records if "NVML is not available" in r.getMessage()]
        assert len(said) == 1 and "No module named 'pynvml'" in said[0]
        assert health.check(HealthConfig(gpus=8)) == ""  # unknown is not unhealthy
    finally:
        gpu.forget()


def test_nproc_per_node_gpu_counts_through_nvml(monkeypatch):
    from etcd_agent.node.hostinfo import count_gpus

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpu.forget()
    try:
        assert gpu.nvml(lambda: FakeNVML(3)) is not None
        assert count_gpus() == 3
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
        assert count_gpus() == 1  # the job's own view wins
    finally:
        gpu.forget()


# --- GPU memory drain ------------------------------------------------------------------------------------------

class Proc:
    def __init__(self, pid: int, used: int):
        self.pid, self.usedGpuMemory = pid, used


class HeldNVML(FakeNVML):
    """Two GPUs; ``held`` pids hold 512 MiB on each until ``release_after`` looks at the processes (one look reads
    both GPUs; None: never); ``looks`` counts them."""

    def __init__(self, held, release_after=None):
        super().__init__(2)
        self.held, self.release_after, self.reads = set(held), release_after, 0

    @property
    def looks(self) -> int:
        return self.reads // self.gpus

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        self.reads += 1
        if self.release_after is not None and (self.reads - 1) // self.gpus >= self.release_after:
            return [Proc(1, 2**30)]  # someone else's process: never waited for
        return [Proc(pid, 2**29) for pid in self.held] + [Proc(1, 2**30)]


def test_drain_waits_for_the_old_workers_memory_and_names_the_pids_that_keep_it():
    """Counted in looks at NVML: a drain looks again until the memory is gone and stops at the first look that
    finds it gone (its limit, 600 s, is far past the test's); at its limit it names the pids still holding some,
    after more than one look; with no pids it does not look."""
    assert gpu.holders({7, 8}, HeldNVML({7})) == {7: 2**30}
    releasing = HeldNVML({7}, release_after=5)
    assert gpu.wait_drained({7}, 600.0, releasing, poll=0.001) == {}
    assert releasing.looks == 6  # five that found the memory held, one that found it gone
    held = HeldNVML({7})
    assert gpu.wait_drained({7}, 2.0, held, poll=0.01) == {7: 2**30}
    assert held.looks >= 2, "the drain gave up at its first look"
    untouched = HeldNVML({7})
    assert gpu.wait_drained(set(), 600.0, untouched) == {} and untouched.looks == 0


def test_a_stop_for_a_new_round_starts_the_gpu_drain_at_once():
    """GPU jobs: the memory drain begins when the workers are stopped for a new round, so it runs while that round
    forms and the next start needs no drain of its own; a stop at the job's end starts none."""
    from etcd_agent import logs
    from etcd_agent.config import AgentConfig, EtcdConfig, JobSpec, WorkerConfig
    from etcd_agent.endpoints import parse_endpoints
    from etcd_agent.node.checks import Checks, Drained
    from etcd_agent.node.supervisor import Supervisor

    class Stopped:  # a group whose stop leaves pid 4242 to drain
        stopped_pids: set[int] = set()

        def stop(self, why, sig):
            self.stopped_pids = {4242}

    cfg = AgentConfig(run_id="r", node_id="n0", spec=JobSpec(1, 1, "gpu", 0), workers=WorkerConfig("unused.py", (), 2),
                      etcd=EtcdConfig(parse_endpoints("127.0.0.1:1")), health=HealthConfig(gpus=2))
    posted: queue.SimpleQueue = queue.SimpleQueue()
    log = logs.get("test").bound(logs.Where("r", "n0"))
    checks = Checks(cfg, posted.put, log)
    workers = Supervisor(cfg, posted.put, lambda *a, **k: None, checks, logs.Where("r", "n0"), log)
    gpu.forget()
    gpu.nvml(lambda: HeldNVML({4242}, release_after=0))
    try:
        workers.group = Stopped()
        workers.stop("the job ended")
        assert not checks.draining and posted.empty()
        workers.stop("round 2 began", next_round=True)
        assert checks.draining
        event = posted.get(timeout=60)
        assert isinstance(event, Drained) and event.group is workers.group and event.held == {}
        checks.drain_done(event, 2)
        assert not checks.must_drain(workers.group) and posted.empty()  # the start goes ahead at once
    finally:
        gpu.forget()


@contextlib.contextmanager
def stopped_workers_keep_gpu_memory():
    """A stand-in worker group (in-process agents, ``test_agent_fsm``) whose stopped workers keep holding GPU memory
    for good, as NVML (a stand-in) reports it; yields the group class to give the agent."""
    from test_agent_fsm import StandInGroup

    class Holding(StandInGroup):
        def stop(self, *args, **kwargs):
            super().stop(*args, **kwargs)
            self.stopped_pids = {os.getpid()}  # the stand-ins run in this process: its pid "holds" the memory

    Holding.started = StandInGroup.started = queue.Queue()
    gpu.forget()
    gpu.nvml(lambda: HeldNVML({os.getpid()}))
    try:
        yield Holding
    finally:
        gpu.forget()


def test_a_restart_whose_old_workers_keep_gpu_memory_fails_naming_them(etcd_endpoint, run_id):
    """The agent with stand-in workers: after a crash the stopped group's pid still holds GPU memory, so the next
    round's workers never start; the failure report (and the job's root cause) names the pid and the flag."""
    from etcd_agent.errors import JobFailed
    from test_agent_fsm import StandInGroup, next_group, start

    with stopped_workers_keep_gpu_memory() as holding:
        _agent, thread, outcome = start(etcd_endpoint, run_id, "n0", group=holding, max_restarts=1,
                                        health=HealthConfig(gpus=2), gpu_drain_timeout=0.5)
        next_group().end(3, local_rank=0)
        thread.join(30)
        error = outcome.get("error")
        assert isinstance(error, JobFailed), outcome
        assert f"GPU memory of the previous workers is still held 0.5 s after they were stopped " \
               f"(--gpu-drain-timeout): pid {os.getpid()} (1024 MiB)" in str(error)
        assert StandInGroup.started.empty()  # round 2's workers never started


def _real_nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml if pynvml.nvmlDeviceGetCount() > 0 else None
    except Exception:  # noqa: BLE001 - no binding, no driver, no GPU
        return None


@pytest.mark.skipif(_real_nvml() is None, reason="needs nvidia-ml-py and an NVIDIA GPU with its driver")
def test_nvml_on_a_real_gpu():
    """Where a GPU is: NVML counts it, a healthy GPU has no problem beyond what NVML reports, and the memory query
    answers for this process (which holds none)."""
    import os

    module = _real_nvml()
    found = gpu.count(module)
    assert found >= 1
    assert gpu.problems(found, module) == [] or all("GPU" in p for p in gpu.problems(found, module))
    assert gpu.problems(found + 1, module)[0] == f"{found} GPU(s) visible, {found + 1} expected"
    assert gpu.holders({os.getpid()}, module) == {}
