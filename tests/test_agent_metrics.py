"""``--metrics-port``: a real agent's metrics scraped over HTTP while its job runs, and the errors and the zero cost
when the flag is not given (``etcd_agent.metrics``). Counts only; nothing here asserts a time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents import JOB, start_agents, wait_all, wait_records
from etcd_agent import metrics
from etcd_agent.agent import State
from etcd_agent.errors import ConfigError
from etcd_agent.proctree import free_port
from etcd_agent.testing.procs import agent_flags

P = metrics.PREFIX



def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels but run and node) -> value, from the agent's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset((k, v) for k, v in s.labels.items() if k not in ("run", "node"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(P + name, frozenset(labels.items()))]


@pytest.mark.chaos
def test_a_crash_and_its_restart_show_in_the_metrics(etcd_endpoint, run_id, tmp_path):
    port = free_port()
    release = tmp_path / "release"
    agents, out = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--fail-rank", "1", "--fail-round", "1",
                                                                    "--run-until", str(release)],
                               extra=["--max-restarts", "2", "--metrics-port", str(port)])
    wait_records(out, {(2, 0), (2, 1)}, agents)  # round 2's workers run: rank 1 crashed in round 1
    samples = scrape(port)
    assert value(samples, "workers", state="running") == 2
    assert value(samples, "workers", state="stopped") == 0
    assert value(samples, "worker_exits_total", cause="exit_code") == 1  # rank 1's exit 3
    assert value(samples, "worker_exits_total", cause="stopped") == 1  # rank 0, stopped for the restart
    assert value(samples, "worker_exits_total", cause="hang") == 0
    assert value(samples, "etcd_request_duration_seconds_count") > 0
    assert value(samples, "round") == 2
    assert value(samples, "state", **{P + "state": "running"}) == 1
    assert value(samples, "fencings_total") == 0 and value(samples, "session_losses_total") == 0
    assert value(samples, "progress_age_seconds") >= 0  # a number while workers run
    series = {name for name, _ in samples}
    assert all(name.startswith(P) or name.startswith("process_") for name in series), series
    release.touch()
    assert wait_all(agents) == [0], agents[0].stderr()[-3000:]
    assert "serving this agent's Prometheus metrics at http://127.0.0.1:" in agents[0].stderr()


def launch(tmp_path, *extra: str, env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    """One agent's command line, run to its end (``code``: a Python program that runs it instead of -m)."""
    argv = [*agent_flags("127.0.0.1:1", "metrics", "node-0", 1, 1), "--etcd-timeout", "1", *extra, JOB,
            str(tmp_path)]
    head = [sys.executable, "-c", code] if code else [sys.executable, "-m", "etcd_agent"]
    return subprocess.run([*head, *argv], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)


def test_the_flag_without_the_library_is_a_clear_error(tmp_path, monkeypatch):
    missing = tmp_path / "no-prometheus"
    (missing / "prometheus_client").mkdir(parents=True)
    (missing / "prometheus_client" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**_env(), "PYTHONPATH": str(missing)}
    done = launch(tmp_path, "--metrics-port", "9", env=env)
    assert done.returncode == 2, done.stderr
    assert "etcd-agent: error: --metrics-port 9 needs the prometheus-client package, which is not installed: pip " \
           "install 'etcd-agent[metrics]'" in done.stderr
    # in-process, the same: the import fails, nothing is served
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigError, match=r"--metrics-port 9 .*etcd-agent\[metrics\]"):
        metrics.start(9, "127.0.0.1", "run", "node")
    assert not metrics.enabled()


def test_a_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = launch(tmp_path, "--metrics-port", str(port))
    assert done.returncode == 2, done.stderr
    assert f"etcd-agent: error: --metrics-port {port}: cannot serve metrics on 127.0.0.1 port {port}: Address " \
           "already in use" in done.stderr


def test_a_bad_port_is_refused(tmp_path):
    done = launch(tmp_path, env={**_env(), "ETCD_AGENT_METRICS_PORT": "70000"})
    assert done.returncode == 2 and "--metrics-port 70000: expected 1-65535, or 0 (off)" in done.stderr


def test_without_the_flag_prometheus_client_is_never_imported(etcd_endpoint, run_id, tmp_path):
    """A whole job (one node, one worker that exits 0) in a process that says at exit what it imported."""
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('prometheus_client imported:', 'prometheus_client' in sys.modules, "
            "'etcd_agent.agent' in sys.modules, file=sys.stderr))\n"
            "sys.argv[0] = 'etcd-agent'\n"
            "runpy.run_module('etcd_agent', run_name='__main__')\n")
    argv = [*agent_flags(etcd_endpoint, run_id, "node-0", 1, 1), JOB, str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60,
                          env=_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prometheus_client imported: False True" in done.stderr  # the agent ran, without the library


def test_the_state_gauge_knows_every_agent_state():
    assert metrics.AGENT_STATES == tuple(s.value for s in State)


def test_hooks_do_nothing_while_off():
    assert not metrics.enabled()

    def attempt():
        return 1
    assert metrics.timed(attempt) is attempt  # not even a wrapper
    metrics.worker_exited(3, True), metrics.worker_hung(), metrics.watch_resumed(), metrics.session_lost()
    metrics.track_workers(lambda: [("", 0.0, False)])
    assert metrics.agent_state(State.FENCED, None) is State.FENCED


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "ETCD_AGENT_"))}
