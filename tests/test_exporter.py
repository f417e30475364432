"""``etcd-agent exporter`` against a real etcd: a real job's metrics, read-only, a compaction, an etcd restart, the
missing extra; and (``-s``) what it costs while 3 jobs run.

The exporter runs as its own process on a free port; each scrape parses ``/metrics`` with prometheus_client's
parser. A scrape has no event to wait on, so the waits for a value poll the HTTP answer (``poll_until``).
Assertions are on counts and values, never on timings.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents import CommandLine, keys_of, poll_until, start_agents, wait_all
from etcd_agent.config import EtcdConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.proctree import free_port
from etcd_agent.etcd.client import Etcd
from etcd_agent.ops.exporter import Follower, prefixes
from etcd_agent.ops.exporter_model import Model
from etcd_agent.coord.abandon import ABANDONED
from etcd_agent.schema.values import JobPointer, Outcome, Phase, Restarts, Result, RoundInfo, SpecValue
from etcd_agent.testing import metrics as etcd_metrics

_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))



class Exporter:
    """``etcd-agent exporter`` as a process, and its ``/metrics`` as ``{(name, ((label, value), ...)): value}``."""

    def __init__(self, endpoint: str, workdir, *args: str):
        self.url = f"http://127.0.0.1:{free_port()}/metrics"
        self.cmd = CommandLine(["exporter", "--etcd-endpoints", endpoint, "--listen", self.url[7:-8], *args],
                               workdir, "exporter")
        poll_until(self._answers, 30, "the exporter did not serve /metrics", interval=0.1)

    def _answers(self) -> bool:
        assert self.cmd.proc.poll() is None, f"the exporter exited:\n{self.cmd.stderr()}"
        try:
            self.text()
            return True
        except OSError:
            return False

    def text(self) -> str:
        with _http.open(self.url, timeout=10) as resp:
            return resp.read().decode()

    def scrape(self) -> dict:
        out = {}
        for family in text_string_to_metric_families(self.text()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def value(self, name: str, **labels) -> float | None:
        found = [v for (n, lab), v in self.scrape().items() if n == name and set(labels.items()) <= set(lab)]
        return found[0] if len(found) == 1 else None

    def wait(self, name: str, want: float, timeout: float = 60.0, **labels) -> None:
        poll_until(lambda: self.value(name, **labels) == want, timeout,
                   f"{name}{labels} did not become {want} (now {self.value(name, **labels)})", interval=0.1)

    def stop(self) -> None:
        self.cmd.proc.terminate()
        assert self.cmd.wait(60) == 0, self.cmd.stderr()


def job_lines(text: str, run_id: str) -> str:
    return "\n".join(line for line in text.splitlines() if run_id in line or line.startswith("etcd_agent_exporter"))


def test_a_real_job_with_a_crash(etcd_endpoint, run_id, tmp_path):
    exp = Exporter(etcd_endpoint, tmp_path, "--run-id", f"{run_id},some-other-run")
    agents, _out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--fail-rank", "1", "--fail-round", "1"],
                                extra=["--max-restarts", "2"])
    assert wait_all(agents, 90) == [0, 0]
    job = {"run": run_id, "job": "1"}
    exp.wait("etcd_agent_job_phase", 1.0, phase="ended", **job)
    exp.wait("etcd_agent_job_result", 1.0, outcome="succeeded", **job)
    print("\n" + job_lines(exp.text(), run_id))
    assert exp.value("etcd_agent_job_phase", phase="running", **job) == 0.0
    assert exp.value("etcd_agent_job_result", outcome="failed", **job) == 0.0
    assert exp.value("etcd_agent_job_abandoned", **job) == 0.0
    assert exp.value("etcd_agent_job_restarts_used", **job) == 1.0
    assert exp.value("etcd_agent_job_restarts_max", **job) == 2.0
    assert exp.value("etcd_agent_job_nodes_planned", **job) == 2.0
    assert exp.value("etcd_agent_job_world_size", **job) == 4.0  # 2 nodes of 2 workers
    assert exp.value("etcd_agent_job_round", **job) == 2.0
    assert exp.value("etcd_agent_job_last_failure", cause="exit", **job) == 1.0
    assert exp.value("etcd_agent_job_last_failure", cause="signal", **job) == 0.0
    assert exp.value("etcd_agent_job_last_restart_timestamp_seconds", **job) is not None
    assert exp.value("etcd_agent_job_round_formation_seconds", **job) is not None
    assert exp.value("etcd_agent_exporter_up") == 1.0
    assert exp.value("etcd_agent_exporter_watch_restarts_total") == 0.0
    # a second exporter started after the job: the same numbers from its first read (and the history it reads)
    late = Exporter(etcd_endpoint, tmp_path, "--run-id", run_id)
    assert late.value("etcd_agent_job_restarts_used", **job) == 1.0
    assert late.value("etcd_agent_job_result", outcome="succeeded", **job) == 1.0
    assert late.value("etcd_agent_job_last_restart_timestamp_seconds", **job) == \
        exp.value("etcd_agent_job_last_restart_timestamp_seconds", **job)
    late.stop()
    exp.stop()


def fake_job(etcd: Etcd, run_id: str, used: int = 0) -> None:
    """The keys of a job in its first round, written by hand (no agent): enough for the exporter to show it."""
    k = keys_of(run_id)
    etcd.put(k.run.job(), JobPointer(1, time.time()).encode())
    etcd.put(k.spec(), SpecValue(2, 2, "1", 3).encode())
    etcd.put(k.round(), RoundInfo(1, Phase.JOINING, "first round", time=time.time()).encode())
    etcd.put(k.restarts(), Restarts(used, 3).encode())


def test_a_job_ended_as_abandoned_is_marked(etcd_endpoint, run_id, tmp_path):
    etcd = etcd_of(etcd_endpoint)
    try:
        fake_job(etcd, run_id, used=1)
        reason = f"{ABANDONED}no node of the job was registered for 15 s"
        etcd.put(keys_of(run_id).result(), Result(Outcome.STOPPED, 1, reason, restarts=1, time=time.time()).encode())
    finally:
        etcd.close()
    exp = Exporter(etcd_endpoint, tmp_path, "--run-id", run_id)
    job = {"run": run_id, "job": "1"}
    exp.wait("etcd_agent_job_abandoned", 1.0, **job)
    assert exp.value("etcd_agent_job_result", outcome="stopped", **job) == 1.0
    exp.stop()


def etcd_of(endpoint: str) -> Etcd:
    return Etcd(EtcdConfig(parse_endpoints(endpoint)))


def test_read_only_and_a_compaction_does_not_break_it(own_etcd, run_id, tmp_path):
    etcd = etcd_of(own_etcd.endpoint)
    try:
        fake_job(etcd, run_id)
        exp = Exporter(own_etcd.endpoint, tmp_path)
        job = {"run": run_id, "job": "1"}
        exp.wait("etcd_agent_job_phase", 1.0, phase="forming", **job)
        before, (_kv, rev) = etcd_metrics.scrape(own_etcd.client_url), etcd.get("/")
        for _ in range(5):
            assert exp.value("etcd_agent_job_restarts_used", **job) == 0.0
        after, (_kv, rev_after) = etcd_metrics.scrape(own_etcd.client_url), etcd.get("/")
        assert rev_after == rev  # the exporter wrote nothing, and a scrape asks etcd nothing
        cost = etcd_metrics.diff(before, after)
        assert cost["rpc_range"] <= 1 and cost["rpc_txn"] == 0 and cost["key_puts"] == 0  # the 1: our own get

        etcd.put(keys_of(run_id).restarts(), Restarts(1, 3).encode())
        exp.wait("etcd_agent_job_restarts_used", 1.0, **job)
        _kv, head = etcd.get("/")
        etcd.compact(head)
        etcd.put(keys_of(run_id).restarts(), Restarts(2, 3).encode())
        exp.wait("etcd_agent_job_restarts_used", 2.0, **job)
        assert exp.value("etcd_agent_exporter_up") == 1.0
        exp.stop()
    finally:
        etcd.close()


def test_a_watch_behind_a_compaction_reads_again(own_etcd, run_id):
    """In process: the watch made to start from a compacted revision is answered "compacted"; the follower reads
    the range again (a Resync) and counts a watch restart."""
    etcd = etcd_of(own_etcd.endpoint)
    model = Model("/etcd-agent")
    follower = Follower(etcd, model, prefixes("/etcd-agent", []), probe=0.5)
    try:
        fake_job(etcd, run_id)
        follower.start()
        etcd.put(keys_of(run_id).restarts(), Restarts(1, 3).encode())
        _kv, head = etcd.get("/")
        etcd.compact(head)
        follower.stream.add("0", follower.prefixes[0], b"/etcd-agent0", 1)  # as if it had fallen behind
        poll_until(lambda: follower.step(0.2) or follower.restarts, 30, "no re-read after the compaction")
        assert [v.restarts_used for v in model.views(time.time(), 3600)] == [1]
    finally:
        follower.stop_watch()
        etcd.close()


@pytest.mark.chaos
def test_it_recovers_after_an_etcd_restart(own_etcd, run_id, tmp_path):
    etcd = etcd_of(own_etcd.endpoint)
    try:
        fake_job(etcd, run_id)
        exp = Exporter(own_etcd.endpoint, tmp_path)
        job = {"run": run_id, "job": "1"}
        exp.wait("etcd_agent_job_restarts_used", 0.0, **job)
        own_etcd.restart()
        etcd.put(keys_of(run_id).restarts(), Restarts(1, 3).encode())
        exp.wait("etcd_agent_job_restarts_used", 1.0, **job)
        exp.wait("etcd_agent_exporter_up", 1.0)
        assert exp.value("etcd_agent_exporter_watch_restarts_total") >= 1
        exp.stop()
    finally:
        etcd.close()


def test_without_prometheus_client_it_names_the_extra(etcd_endpoint):
    code = ("import sys; sys.modules['prometheus_client'] = None; from etcd_agent.cli.main import main; "
            "sys.exit(main(sys.argv[1:]))")
    got = subprocess.run([sys.executable, "-c", code, "exporter", "--etcd-endpoints", etcd_endpoint],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 2
    assert "pip install 'etcd-agent[metrics]'" in got.stderr


@pytest.mark.chaos
def test_what_it_costs_while_three_jobs_run(own_etcd, tmp_path):
    """Measured, not asserted (run with -s): the exporter's CPU seconds over 30 s and what etcd served meanwhile,
    against the same 30 s of the same jobs without it."""
    release = tmp_path / "release"
    agents = []
    for j in range(3):
        (tmp_path / f"j{j}").mkdir()
        started, _out = start_agents(2, own_etcd.endpoint, f"cost-{j}", tmp_path / f"j{j}",
                                     ["--run-until", str(release)])
        agents += started
    exp = Exporter(own_etcd.endpoint, tmp_path)
    for j in range(3):
        exp.wait("etcd_agent_job_phase", 1.0, timeout=60, phase="running", run=f"cost-{j}", job="1")
    proc = psutil.Process(exp.cmd.proc.pid)
    cpu0, m0 = sum(proc.cpu_times()[:2]), etcd_metrics.scrape(own_etcd.client_url)
    for _ in range(2):  # two scrapes, as a 15 s scrape interval would make
        time.sleep(15)  # the measured window itself (a scrape interval), not a synchronization
        exp.text()
    cpu1, m1 = sum(proc.cpu_times()[:2]), etcd_metrics.scrape(own_etcd.client_url)
    exp.stop()
    time.sleep(30)  # the window without the exporter, to compare with: measured, not a wait for an event
    m2 = etcd_metrics.scrape(own_etcd.client_url)
    with_it, without = etcd_metrics.diff(m0, m1), etcd_metrics.diff(m1, m2)
    print(f"\nexporter CPU over 30 s: {cpu1 - cpu0:.3f} s")
    for q in ("rpc_range", "rpc_txn", "watch_responses", "watch_events", "sent_bytes"):
        print(f"etcd {q} in 30 s: {with_it[q]:.0f} with the exporter, {without[q]:.0f} without")
    release.touch()
    assert wait_all(agents, 60) == [0] * 6
