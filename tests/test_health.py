"""The health gate (health.py, gpu.py): decisions over injected readings, the command check, NVML through a stand-in
module, and a real job in which one node is unhealthy until its check passes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys

import pytest

from agents import keys_of, start_agents, until_recorded, wait_all, wait_logged, watch_until
from etcd_agent.config import HealthConfig, QuarantinePolicy
from etcd_agent.coord import quarantine
from etcd_agent.node import gpu, health
from etcd_agent.errors import ConfigError
from etcd_agent.coord.decide import Bump, CheckHealth, ClosePlan, JoinRound, Params, Wait, decide
from etcd_agent.coord.mirror import JOINING
from etcd_agent.schema.values import NodeInfo
from etcd_agent.testing import procs
from etcd_agent.testing import records as record_files
from test_rendezvous import ME, NOW, PARAMS, jn, me, mk_plan, running_here, view

COMMAND_WAIT = 120  # seconds a status or events command may take on a loaded machine: a bound, not what is tested


def registered(endpoint: str, run_id: str, node: str, holds, what: str) -> NodeInfo:
    """The node's registry entry once ``holds(entry)``, watched in etcd."""
    key = keys_of(run_id).node(node)

    def entry(keys: dict) -> NodeInfo | None:
        info = NodeInfo.from_json(key, json.loads(keys[key])) if key in keys else None
        return info if info is not None and holds(info) else None
    return watch_until(endpoint, key, entry, 30, what)


def sick(v, node: str, why: str = "GPU 0 has 2 uncorrectable ECC error(s)"):
    return dataclasses.replace(v, nodes={**v.nodes, node: NodeInfo(node, health=why)})


# --- decisions -------------------------------------------------------------------------------------------------

def test_an_unhealthy_node_waits_for_its_next_check_then_tries_to_join():
    v = view(phase=JOINING, nodes=[ME, "node-b"], joins=[jn("node-b", 12)])
    waiting = decide(v, me(unhealthy="bad GPU", health_retry_at=NOW + 5), PARAMS)
    assert isinstance(waiting, Wait) and waiting.deadline == NOW + 5 and "unhealthy (bad GPU)" in waiting.why
    assert isinstance(decide(v, me(unhealthy="bad GPU", health_retry_at=NOW), PARAMS), JoinRound)
    assert isinstance(decide(v, me(), PARAMS), JoinRound)


def test_an_unhealthy_node_outside_a_running_round_checks_again_when_due():
    v = view(nodes=[ME, "node-b"], plan=mk_plan(3, ["node-b"]), joins=["node-b"])
    waiting = decide(v, me(unhealthy="bad GPU", health_retry_at=NOW + 5), PARAMS)
    assert isinstance(waiting, Wait) and waiting.deadline == NOW + 5
    assert isinstance(decide(v, me(unhealthy="bad GPU", health_retry_at=NOW), PARAMS), CheckHealth)
    assert isinstance(decide(v, me(), PARAMS), Wait)  # healthy: it waits to be taken into the next round


def test_the_fast_path_does_not_wait_for_an_unhealthy_node():
    p = Params(2, 4, 3, 30.0, 60.0, 1.0)
    v = view(phase=JOINING, nodes=[ME, "node-b", "node-c"], joins=[jn(ME, 11), jn("node-b", 12)],
             last_plan=mk_plan(2, [ME, "node-b", "node-c"]))
    assert isinstance(decide(v, me(round_seen_at=NOW, min_reached_at=NOW), p), Wait)  # node-c may still come
    action = decide(sick(v, "node-c"), me(round_seen_at=NOW, min_reached_at=NOW), p)
    assert isinstance(action, ClosePlan) and action.plan.nodes == [ME, "node-b"]


def test_an_unhealthy_newcomer_does_not_scale_the_job_up_and_a_healthy_one_does():
    v = view(nodes=[ME, "node-b", "node-new"], plan=mk_plan(3, [ME, "node-b"]))
    later = running_here(now=NOW + 10, newcomers_since=NOW)
    assert isinstance(decide(v, later, PARAMS), Bump)
    assert isinstance(decide(sick(v, "node-new"), later, PARAMS), Wait)


def test_a_join_timeout_names_the_unhealthy_node_and_why():
    v = sick(view(phase=JOINING, nodes=[ME, "node-b"], joins=[jn(ME, 11)]), "node-b", "no GPU")
    action = decide(v, me(round_seen_at=NOW - 60.0), PARAMS)
    assert "missing: node-b (unhealthy: no GPU)" in action.result.reason


def test_backoff_grows_to_a_minute():
    assert [health.backoff(n) for n in (1, 2, 3, 4, 5, 9)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


# --- the command ------------------------------------------------------------------------------------------------

def cmd(text: str, timeout: float = 10.0) -> HealthConfig:
    return health.parse(text, timeout, None)


def test_a_command_that_exits_0_is_healthy():
    assert health.check(cmd("true")) == ""
    assert not HealthConfig().active and cmd("true").active


def test_a_failing_command_says_its_exit_code_and_first_line():
    script = f"{sys.executable} -c \"print(); print('ECC errors on GPU 3'); print('more'); raise SystemExit(4)\""
    assert health.check(cmd(script)).endswith("failed with exit code 4: ECC errors on GPU 3")


def test_a_command_past_its_timeout_is_unhealthy_and_killed_with_what_it_started(tmp_path):
    """The check command starts a child that would live a minute, then hangs: at its timeout the whole process
    group goes, the child with it (a wait on the child's end, bounded, instead of sleeping past its lifetime)."""
    pidfile = tmp_path / "child.pid"
    # the sleeps are the child and the hang the test is about (they outlive the timeout), not waits
    problem = health.check(cmd(f"sh -c 'sleep 60 & echo $! > {pidfile}; exec sleep 30'", timeout=1.0))
    assert "did not finish within 1 s (--health-check-timeout)" in problem
    child = procs.processes([int(pidfile.read_text())])  # the file is there: the child did start
    procs.gone_within(child, 60, "child of the check")


class RecordedPopen(subprocess.Popen):
    """A Popen that records each wait on its output: (the timeout asked, whether it ran out)."""
    waits: list[tuple[float | None, bool]] = []

    def communicate(self, *args, timeout=None, **kwargs):
        try:
            got = super().communicate(*args, timeout=timeout, **kwargs)
        except subprocess.TimeoutExpired:
            self.waits.append((timeout, True))
            raise
        self.waits.append((timeout, False))
        return got


def test_a_check_whose_output_an_escaped_process_holds_is_a_timeout_within_the_limit(tmp_path, monkeypatch):
    """The command exits 0 at once, but a process it started in a session of its own (beyond the kill of the
    command's process group) keeps its output open: the check ends at its limit (plus a short drain), a timeout
    that says why, instead of blocking on the output until that process ends. The waits on the output are
    recorded: the whole limit, run out, then the drain, run out; never one without a limit."""
    pidfile = tmp_path / "escaped.pid"
    script = f"sh -c 'setsid sh -c \"echo \\$\\$ > {pidfile}; exec sleep 60\" & echo ok'"  # sleep: it lives on
    monkeypatch.setattr(health.subprocess, "Popen", RecordedPopen)
    RecordedPopen.waits = []
    try:
        problem = health.check(cmd(script, timeout=1.0))
    finally:
        pid = int(record_files.wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10,
                                          "the escaped process's pid", tmp_path))
        escaped_alive = not procs.gone(pid)  # the order that matters: the check returned while it still ran
        os.kill(pid, signal.SIGKILL)
    assert problem.endswith("did not finish within 1 s (--health-check-timeout): a process it started still holds "
                            "its output (it left the check's process group, so it was not killed)"), problem
    assert escaped_alive, "the check waited for the escaped process to end"
    assert RecordedPopen.waits == [(1.0, True), (health.DRAIN, True)], "the check gave up before its limit"


def test_a_check_that_exits_0_while_its_child_holds_the_output_is_a_timeout_and_the_child_is_killed(tmp_path):
    pidfile = tmp_path / "child.pid"  # its sleep 60: a child that outlives the check, not a wait
    problem = health.check(cmd(f"sh -c 'sh -c \"echo \\$\\$ > {pidfile}; exec sleep 60\" & echo ok'", timeout=1.0))
    assert problem.endswith("did not finish within 1 s (--health-check-timeout): it exited, but a process it "
                            "started held its output open until it was killed"), problem
    procs.gone_within(procs.processes([int(pidfile.read_text())]), 60, "child of the check")


def test_a_command_that_cannot_run_is_unhealthy(tmp_path):
    """A program that was there at start and is gone when the check runs: unhealthy, saying why."""
    gone = HealthConfig((str(tmp_path / "removed-check"),), 5.0)
    assert "could not run: No such file or directory" in health.check(gone)


@pytest.mark.parametrize("text, problem", [
    ("/no/such/health-check --quick", "the program '/no/such/health-check' is not an executable file"),
    ("no-such-health-check-program", "the program 'no-such-health-check-program' is not found on PATH"),
])
def test_a_check_program_that_is_not_there_is_refused_at_start(text, problem):
    with pytest.raises(ConfigError, match=f"--health-check '{text}': {problem}"):
        cmd(text)


def test_an_agent_whose_check_program_is_missing_exits_2_naming_the_flag(etcd_endpoint, run_id, tmp_path):
    agents, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, [], nproc=1,
                             extra=["--health-check", "/no/such/health-check"])
    assert agents[0].wait(30) == 2
    assert "--health-check '/no/such/health-check': the program '/no/such/health-check' is not an executable " \
           "file" in agents[0].stderr()


@pytest.mark.parametrize("text, timeout, problem", [
    ("", 5.0, "--health-check is empty"), ("check 'unclosed", 5.0, "--health-check"),
    ("true", 0.0, "--health-check-timeout must be positive"),
])
def test_bad_health_flags_name_the_flag(text, timeout, problem):
    with pytest.raises(ConfigError, match=problem):
        health.parse(text, timeout, None)


def test_the_flags_reach_the_agent_config(tmp_path):
    from etcd_agent.cli.main import build_parser
    from etcd_agent.cli.launch import resolve

    script = tmp_path / "train.py"
    script.write_text("")
    parser = build_parser()
    ns = parser.parse_args(["--health-check", "true -q", "--health-check-timeout", "7", str(script)])
    cfg = resolve(parser, ns).cfg
    assert cfg.health == HealthConfig(("true", "-q"), 7.0, None)


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


# --- a real job ------------------------------------------------------------------------------------------------

def test_an_unhealthy_node_stays_out_until_its_check_passes(etcd_endpoint, run_id, tmp_path):
    """node-1's check fails until a file exists: node-0 runs the job alone, status and events say why node-1 is out;
    once the check passes node-1 joins (a scale-up) and both finish."""
    healthy_flag, release = tmp_path / "node-1-healthy", tmp_path / "release"
    code = f"import os, sys; os.path.exists({str(healthy_flag)!r}) or sys.exit('GPU 0 is lost')"
    check = f"{sys.executable} -c \"{code}\""
    first, out = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                              nnodes="1:2")
    second, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                             nnodes="1:2", first=1, extra=["--health-check", check])
    agents = first + second
    base = [sys.executable, "-m", "etcd_agent"]
    ep = ["--etcd-endpoints", etcd_endpoint, "--run-id", run_id]

    def status() -> str:
        return subprocess.run(base + ["status", *ep], capture_output=True, text=True, timeout=COMMAND_WAIT).stdout
    until_recorded(out, lambda found: (1, 0) in found, "node-0 running round 1 alone", agents)
    registered(etcd_endpoint, run_id, "node-1", lambda info: info.health, "node-1 registered as unhealthy")
    shown = status()
    assert "round 1: running (1 node(s): node-0)" in shown
    assert "unhealthy, not joining: node-1: --health-check" in shown and "exit code 1: GPU 0 is lost" in shown
    healthy_flag.touch()
    # the next check passed: the job scaled up to both nodes
    until_recorded(out, lambda found: (2, 1) in found, "node-1 running rank 1 in round 2", agents)
    release.touch()
    assert wait_all(agents) == [0, 0], [a.stderr()[-2000:] for a in agents]
    err = second[0].stderr()
    assert err.count("this node is unhealthy and does not join") == 1  # said once, however many checks failed
    assert "passed its health check after" in err
    events = subprocess.run(base + ["events", *ep], capture_output=True, text=True, timeout=COMMAND_WAIT).stdout
    unhealthy = re.search(r"  node unhealthy +node-1 +does not join: --health-check", events)
    healthy = re.search(r"  node healthy +node-1 +passed its health check: it joins again", events)
    joined = re.search(r"  joined round +node-1 +round ", events)
    assert unhealthy and healthy and joined, events
    assert unhealthy.start() < healthy.start() < joined.start()


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


# --- quarantine ------------------------------------------------------------------------------------------------

def test_the_kth_failure_within_the_window_starts_a_cooldown():
    policy = QuarantinePolicy(after=3, window=100.0, cooldown=50.0)
    q = quarantine.record_failure(None, "n2", 10.0, policy, 10.0)
    assert q.failures == (10.0,) and not q.until
    q = quarantine.record_failure(q, "n2", 20.0, policy, 20.0)
    assert quarantine.quarantined(q, 20.0) == ""
    late = quarantine.record_failure(q, "n2", 200.0, policy, 200.0)  # the first two fell out of the window
    assert late.failures == (200.0,) and not late.until
    q = quarantine.record_failure(q, "n2", 30.0, policy, 30.0)
    assert q.until == 80.0 and q.failures == ()
    assert "3 worker failure(s) within 100 s (--quarantine-after 3)" in q.reason
    assert quarantine.quarantined(q, 79.0).startswith("quarantined until ") and quarantine.quarantined(q, 80.0) == ""


def test_quarantine_flags_are_checked():
    assert not QuarantinePolicy().active and QuarantinePolicy(after=2).active
    with pytest.raises(ConfigError, match="--quarantine-after must be 0"):
        QuarantinePolicy(after=-1)
    with pytest.raises(ConfigError, match="--quarantine-window and --quarantine-cooldown must be positive"):
        QuarantinePolicy(after=2, cooldown=0)


def test_a_node_that_keeps_failing_is_quarantined_and_the_job_finishes_on_the_rest(etcd_endpoint, run_id, tmp_path):
    """node-2's workers fail in every round: after its second failure it quarantines itself, the two others re-form
    at once without it (its restarts stop there) and finish; status and events say it sat out and until when."""
    release = tmp_path / "release"
    extra = ["--max-restarts", "5", "--quarantine-after", "2", "--quarantine-cooldown", "600"]
    good, out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                             nnodes="2:3", extra=extra)
    bad, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--always-fail"], nproc=1, nnodes="2:3", first=2,
                          extra=extra)
    until_recorded(out, lambda found: len([k for k in found if k[0] == 3]) == 2, "round 3 running on two nodes",
                   good, timeout=60)
    base = [sys.executable, "-m", "etcd_agent"]
    ep = ["--etcd-endpoints", etcd_endpoint, "--run-id", run_id]
    shown = subprocess.run(base + ["status", *ep], capture_output=True, text=True, timeout=COMMAND_WAIT).stdout
    assert "round 3: running (2 node(s): " in shown and "node-2" not in shown.split("round 3: running")[1].split(")")[0]
    assert "restarts: 2 of 5 used" in shown
    assert "quarantined: node-2 until " in shown
    assert "(2 worker failure(s) within 600 s (--quarantine-after 2))" in shown
    assert "unhealthy, not joining: node-2: quarantined until " in shown
    release.touch()
    # the quarantined agent is still one of the job's: it leaves with the others when the job ends
    assert wait_all(good + bad) == [0, 0, 0], [a.stderr()[-2000:] for a in good + bad]
    assert "this node is unhealthy and does not join: quarantined until " in bad[0].stderr()
    events = subprocess.run(base + ["events", *ep], capture_output=True, text=True, timeout=COMMAND_WAIT).stdout
    assert re.search(r"  quarantined +node-2 +until ", events), events
    assert re.search(r"  node unhealthy +node-2 +does not join: ", events), events
    assert re.search(r"  result +- +succeeded in round 3", events), events


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


# --- a slow check, a forged registration: no endless scale-ups ----------------------------------------------------

def _events(etcd_endpoint: str, run_id: str) -> list[dict]:
    import json

    done = subprocess.run([sys.executable, "-m", "etcd_agent", "events", "--etcd-endpoints", etcd_endpoint,
                           "--run-id", run_id, "--json"], capture_output=True, text=True, timeout=COMMAND_WAIT)
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _scale_ups(etcd_endpoint: str, run_id: str) -> list[dict]:
    return [e for e in _events(etcd_endpoint, run_id)
            if e.get("event") == "round opened" and "(scale-up)" in e.get("reason", "")]


def test_a_newcomer_whose_passing_check_outlasts_the_last_call_joins_after_one_scale_up(etcd_endpoint, run_id,
                                                                                          tmp_path):
    """A 1:2 job runs on node-0; node-1 comes with a passing check that takes at least 3 s (node-0's last call is
    1 s) and lasts until the test has seen it in status. It is counted only once the check passed: one scale-up
    takes it in, and the workers are not restarted for it again and again.

    node-1's own last call is long: when it joins the scale-up round first it leads it, and node-0 joins only once
    its worker stopped, which on a loaded machine can take longer than 1 s (the round would close without node-0,
    and a second scale-up take it back in)."""
    release = tmp_path / "release"
    passes = tmp_path / "check-passes"  # the check passes once this exists: after status showed it running
    script = tmp_path / "check.py"
    script.write_text("import sys, time\nfrom etcd_agent.testing import records\n\n"
                      "time.sleep(3)\nrecords.wait_path(sys.argv[1])\n")  # the check's own length: what is tested
    check = f"{sys.executable} {script} {passes}"
    first, out = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                              nnodes="1:2")
    until_recorded(out, lambda found: (1, 0) in found, "node-0 running round 1 alone", first)
    second, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                             nnodes="1:2", first=1,
                             extra=["--health-check", check, "--health-check-timeout", "600", "--last-call", "60"])
    status = [sys.executable, "-m", "etcd_agent", "status", "--etcd-endpoints", etcd_endpoint, "--run-id", run_id]
    registered(etcd_endpoint, run_id, "node-1", lambda info: info.checking, "node-1 registered as checking")
    shown = subprocess.run(status, capture_output=True, text=True, timeout=COMMAND_WAIT).stdout
    assert "checking its health, not joining yet: node-1" in shown, shown
    passes.touch()
    joined = until_recorded(out, lambda found: [k for k in found if k[1] == 1], "node-1 running as rank 1",
                            first + second, timeout=60)
    release.touch()
    assert wait_all(first + second) == [0, 0], [a.stderr()[-2000:] for a in first + second]
    scale_ups = _scale_ups(etcd_endpoint, run_id)
    assert 1 <= len(scale_ups) <= 2, scale_ups
    assert joined[0][0] <= 3


def test_a_forged_registration_costs_at_most_one_scale_up(etcd_endpoint, run_id, tmp_path):
    """A registry entry on a live lease that no agent stands behind (it never joins): the leader scales up for it
    once, says it was passed over, and never again; a real newcomer after it still gets in."""
    from etcd_agent.config import EtcdConfig
    from etcd_agent.endpoints import parse_endpoints
    from etcd_agent.etcd.client import Etcd

    release = tmp_path / "release"
    first, out = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                              nnodes="1:3")
    until_recorded(out, lambda found: (1, 0) in found, "node-0 running round 1 alone", first)
    etcd = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
    try:
        lease = etcd.lease_grant(300)
        etcd.put(keys_of(run_id).node("node-x"), NodeInfo("node-x", "nowhere", "10.9.9.9", 1).encode(), lease)
        said = "node-x was not taken into round 2, the scale-up made for it; the job does not scale up for it again"
        wait_logged(first[0], said)
        second, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                                 nnodes="1:3", first=1)
        until_recorded(out, lambda found: [k for k in found if k[1] == 1], "node-1 running as rank 1",
                       first + second, timeout=60)
        scale_ups = _scale_ups(etcd_endpoint, run_id)
        release.touch()
        assert wait_all(first + second) == [0, 0], [a.stderr()[-2000:] for a in first + second]
    finally:
        etcd.close()
    assert [e["reason"] for e in scale_ups] == ["node(s) node-x can join (scale-up)",
                                                "node(s) node-1 can join (scale-up)"]
    assert first[0].stderr().count("node-x was not taken into round") == 1


def test_when_every_node_is_unhealthy_the_join_timeout_fails_the_job_naming_them(etcd_endpoint, run_id, tmp_path):
    """Nobody can join: the join timeout still fires, counted from the round's start, and the job fails naming
    each unhealthy node and why; the wait lines say when the round times out."""
    check = f"{sys.executable} -c \"import sys; sys.exit('GPU 0 is lost')\""
    agents, _ = start_agents(2, etcd_endpoint, run_id, tmp_path, [], nproc=1,
                             extra=["--health-check", check, "--join-timeout", "3"])
    assert [a.wait(60) for a in agents] == [1, 1], [a.stderr()[-2000:] for a in agents]
    err = agents[0].stderr() + agents[1].stderr()
    assert "rendezvous timed out: 0 of at least 2 node(s) joined round 1 within 3 s (--join-timeout); missing: " \
           "node-0 (unhealthy: --health-check" in err
    assert "node-1 (unhealthy: --health-check" in err and "failed with exit code 1: GPU 0 is lost" in err
    assert any("checks again" in line and "the round times out in " in line for line in err.splitlines())
