"""Nothing blocks the agent's loop: a slow health check and a GPU memory drain run off it, so a signal,
``etcd-agent stop`` and a peer's loss are handled while they run; the signal handler only posts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil

from agents import keys_of, poll_until, start_agents, wait_all

from etcd_agent.node import health
from etcd_agent.coord import txns
from etcd_agent.agent import Agent, Signalled, install_signal_handlers
from etcd_agent.config import AgentConfig, EtcdConfig, JobSpec, WorkerConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.errors import JobStopped

SLOW_CHECK = ["--health-check", "sleep 90", "--health-check-timeout", "100"]  # far longer than any wait below


def checking(agent) -> bool:
    """Whether the agent's health check (``sleep 90``) runs now."""
    return any(p.cmdline() == ["sleep", "90"] for p in psutil.Process(agent.proc.pid).children(recursive=True))


def registered(endpoint: str, run_id: str, node: str) -> bool:
    out = subprocess.run(["etcdctl", "--endpoints", endpoint, "get", "--keys-only",
                          keys_of(run_id).node(node)], capture_output=True, text=True, timeout=120).stdout
    return bool(out.strip())


def test_sigterm_during_a_slow_health_check_ends_the_agent_at_once(etcd_endpoint, run_id, tmp_path):
    agents, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, [], nproc=1, extra=SLOW_CHECK)
    poll_until(lambda: registered(etcd_endpoint, run_id, "node-0"), 30, "node-0 registered")
    poll_until(lambda: checking(agents[0]), 30, "node-0 checking its health")
    check = next(p for p in psutil.Process(agents[0].proc.pid).children(recursive=True) if p.name() == "sleep")
    agents[0].proc.send_signal(signal.SIGTERM)
    assert agents[0].wait(60) == 128 + signal.SIGTERM, agents[0].stderr()[-2000:]
    check.wait(60)  # the running check did not outlive the agent
    assert "received SIGTERM" in agents[0].stderr()
    assert not registered(etcd_endpoint, run_id, "node-0")  # it left: its lease was revoked


def test_stop_is_seen_while_a_newcomer_checks_its_health(etcd_endpoint, run_id, tmp_path):
    """node-0 runs a 1:2 job; node-1 arrives with a health check that takes 90 s. ``etcd-agent stop`` ends both
    agents at once: node-1 is not stuck in its check."""
    release = tmp_path / "release"
    first, out = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                              nnodes="1:2")
    poll_until(lambda: any(out.iterdir()), 60, "node-0's worker running")
    second, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, [], nproc=1, nnodes="1:2", first=1,
                             extra=SLOW_CHECK)
    poll_until(lambda: checking(second[0]), 30, "node-1 checking its health")
    stopped = subprocess.run([sys.executable, "-m", "etcd_agent", "stop", "--etcd-endpoints", etcd_endpoint,
                              "--run-id", run_id], capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    codes = wait_all(first + second, timeout=60)
    assert codes[0] == codes[1] != 0, [a.stderr()[-2000:] for a in first + second]
    assert "stopped" in second[0].stderr()


def test_a_stop_during_a_gpu_memory_drain_is_handled_at_once(etcd_endpoint, run_id):
    """After a crash the stopped worker's pid still holds GPU memory and --gpu-drain-timeout is 600 s (past the
    test's timeout): while the agent waits for the memory, ``stop`` ends the job, not the drain's end."""
    from test_agent_fsm import StandInGroup, next_group, start
    from test_health import stopped_workers_keep_gpu_memory

    with stopped_workers_keep_gpu_memory() as holding:
        agent, thread, outcome = start(etcd_endpoint, run_id, "n0", group=holding, max_restarts=1,
                                       health=health.HealthConfig(gpus=2), gpu_drain_timeout=600.0)
        next_group().end(3, local_rank=0)
        poll_until(lambda: agent.checks.draining, 30, "the agent draining the old workers' GPU memory")
        assert txns.stop_job(agent.coord.etcd, agent.keys, "stopped by the test", time.time())
        thread.join(60)
        assert not thread.is_alive() and agent.checks.draining, "the drain, not the stop, would have ended it"
        assert isinstance(outcome.get("error"), JobStopped), outcome
        assert StandInGroup.started.empty()  # round 2's workers never started


def test_the_signal_handler_only_posts(monkeypatch):
    """The handler (``Agent.leave``) neither starts a thread nor takes a lock: it posts the signal to the agent's
    queue and to the relay thread started beforehand, which sets the shutdown event."""
    cfg = AgentConfig(run_id="r", node_id="n0", spec=JobSpec(1, 1, "1", 0), workers=WorkerConfig("unused.py", (), 1),
                      etcd=EtcdConfig(parse_endpoints("127.0.0.1:1")))
    agent = Agent(cfg, "test")  # never run: nothing here talks to etcd
    before = signal.getsignal(signal.SIGUSR1)
    install_signal_handlers(agent, (signal.SIGUSR1,))
    try:
        started = []
        monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self.name))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert agent.events.get(timeout=60) == Signalled(signal.SIGUSR1)
        assert agent.shutdown.wait(60) and agent.signalled == signal.SIGUSR1
        assert started == []
    finally:
        signal.signal(signal.SIGUSR1, before)
