"""A real Prometheus scraping ``etcd-agent exporter`` and three agents' ``--metrics-port`` while a job crashes,
loses a node and ends; and deploy/prometheus/alerts.yml loaded as its rule file.

Prometheus runs as a process on a free port with a 1 s scrape and evaluation interval; the test reads what it
stored through its HTTP API (``/api/v1/query``, ``/api/v1/rules``). A stored value has no event to wait on, so
those waits poll (``poll_until``). Assertions are on counts and values, never on timings; ``-s`` prints each
PromQL answer checked.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from agents import AgentProc, CommandLine, RoundWatcher, poll_until, wait_all, wait_records
from etcd_agent.proctree import free_port
from etcd_agent.testing.procs import kill_tree

pytestmark = [pytest.mark.chaos,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="no prometheus binary on PATH")]

ALERTS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"
TTL = 3  # short leases: the lost node's lease ends soon after its SIGKILL
WAIT = 90.0  # generous: a value takes a scrape (1 s) after the event, on a loaded machine maybe many
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Prometheus:
    """A ``prometheus`` process scraping ``targets`` ({scrape job: [host:port]}; the exporter's with
    honor_labels) every second, with ``rules`` loaded, and its HTTP API."""

    def __init__(self, workdir: Path, exporter: str, agents: list[str], rules: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": "etcd-agent-exporter", "honor_labels": True,
                 "static_configs": [{"targets": [exporter]}]},
                {"job_name": "etcd-agent", "static_configs": [{"targets": agents}]},
            ],
        }
        path = workdir / "prometheus.yml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log = open(workdir / "prometheus.log", "w+")
        self.proc = subprocess.Popen([shutil.which("prometheus"), f"--config.file={path}",
                                      f"--storage.tsdb.path={workdir / 'tsdb'}",
                                      f"--web.listen-address={self.url[7:]}"],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        poll_until(self._ready, 60, "prometheus was not ready", interval=0.2)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited {self.proc.returncode}:\n{self.output()[-3000:]}"
        try:
            with _http.open(self.url + "/-/ready", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def api(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with _http.open(f"{self.url}/api/v1/{path}{query}", timeout=10) as resp:
            answer = json.loads(resp.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, promql: str) -> list[tuple[dict, float]]:
        """An instant query's vector: (labels, value) per series."""
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def scalar(self, promql: str) -> float | None:
        """The value of a query that gives one series, None while it gives none or several."""
        found = self.query(promql)
        return found[0][1] if len(found) == 1 else None

    def wait(self, promql: str, want: float, at_least: bool = False, timeout: float = WAIT) -> float:
        """Poll until ``promql`` gives one series whose value is ``want`` (``at_least``: ``want`` or more); prints
        the answer."""
        def ok():
            got = self.scalar(promql)
            return got is not None and (got >= want if at_least else got == want)
        what = f"{promql} did not become {'>= ' if at_least else ''}{want}"
        poll_until(ok, timeout, f"{what} (now {self.query(promql)})", interval=0.5)
        got = self.scalar(promql)
        print(f"  {promql} = {got:g}")
        return got

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(60)
        self.log.close()


@pytest.fixture
def prometheus():
    started: list[Prometheus] = []
    yield lambda *args: started.append(Prometheus(*args)) or started[-1]
    for p in started:
        p.stop()


def test_prometheus_follows_a_crash_a_lost_node_and_the_end(prometheus, etcd_endpoint, run_id, tmp_path):
    exporter_at = f"127.0.0.1:{free_port()}"
    exporter = CommandLine(["exporter", "--etcd-endpoints", etcd_endpoint, "--run-id", run_id,
                            "--listen", exporter_at], tmp_path, "exporter")
    release, out = tmp_path / "release", tmp_path / "out"
    out.mkdir()
    ports = {f"node-{i}": free_port() for i in range(3)}
    rounds = RoundWatcher(etcd_endpoint, run_id)
    agents = [AgentProc(etcd_endpoint, run_id, node, tmp_path,
                        [str(out), "--fail-rank", "1", "--fail-round", "1", "--run-until", str(release)],
                        nnodes="2:3", nproc=2,
                        extra=["--lease-ttl", str(TTL), "--max-restarts", "3", "--metrics-port", str(port)])
              for node, port in ports.items()]
    prom = prometheus(tmp_path, exporter_at, [f"127.0.0.1:{p}" for p in ports.values()], ALERTS)
    try:
        run = f'run="{run_id}"'
        print(f"\nPromQL answers (run {run_id}):")
        prom.wait('up{job="etcd-agent-exporter"}', 1)
        prom.wait("etcd_agent_exporter_up", 1)
        # round 1: rank 1 exits 3; the job restarts into a round that runs with all three nodes
        prom.wait(f"etcd_agent_job_restarts_used{{{run}}}", 1)
        prom.wait(f"etcd_agent_job_restarts_max{{{run}}}", 3)
        r2 = rounds.wait_for(lambda v: v["phase"] == "running" and v.get("nodes") == 3 and v["round"] >= 2,
                             WAIT)["round"]
        wait_records(out, {(r2, r) for r in range(6)}, agents, WAIT)
        prom.wait(f"etcd_agent_job_nodes_planned{{{run}}}", 3)
        prom.wait(f'etcd_agent_job_last_failure{{{run},cause="exit"}}', 1)
        crash = f'etcd_agent_agent_worker_exits_total{{{run},cause="exit_code"}}'
        prom.wait(f"count({crash})", 3)  # all three agents scraped
        prom.wait(f"sum({crash})", 1)
        # the node to kill: one whose workers did not crash, so the survivors keep the crash in their counters
        by_node = {labels["node"]: v for labels, v in prom.query(crash)}
        print(f"  {crash} by node: {by_node}")
        node = sorted(n for n, v in by_node.items() if v == 0)[-1]
        victim = next(a for a in agents if a.node == node)
        kill_tree(victim.proc.pid, psutil.Process(victim.proc.pid).children(recursive=True))
        assert victim.wait(60) == -signal.SIGKILL

        # the loss: a new round with the two others, a loss report, a second restart
        running2 = rounds.wait_for(lambda v: v["phase"] == "running" and v.get("nodes") == 2 and v["round"] > r2,
                                   WAIT)["round"]
        prom.wait(f"etcd_agent_job_nodes_planned{{{run}}}", 2)
        prom.wait(f"max_over_time(etcd_agent_job_nodes_planned{{{run}}}[5m])", 3)
        prom.wait(f'etcd_agent_job_last_failure{{{run},cause="lost"}}', 1)
        prom.wait(f'etcd_agent_job_last_failure{{{run},cause="exit"}}', 0)
        prom.wait(f"etcd_agent_job_restarts_used{{{run}}}", 2)
        prom.wait(f"etcd_agent_job_round{{{run}}}", running2)
        prom.wait(f'sum(etcd_agent_agent_worker_exits_total{{{run},cause="exit_code",node!="{node}"}})', 1,
                  at_least=True)
        prom.wait(f'up{{job="etcd-agent",instance="127.0.0.1:{ports[node]}"}}', 0)
        prom.wait('count(up{job="etcd-agent"} == 1)', 2)

        survivors = [a for a in agents if a is not victim]
        release.touch()
        assert wait_all(survivors, WAIT) == [0, 0], [a.stderr()[-3000:] for a in survivors]
        prom.wait(f'etcd_agent_job_phase{{{run},phase="ended"}}', 1)
        prom.wait(f'etcd_agent_job_result{{{run},outcome="succeeded"}}', 1)
        prom.wait(f'etcd_agent_job_result{{{run},outcome="failed"}}', 0)

        # deploy/prometheus/alerts.yml: every rule loaded and evaluated without error
        def rules() -> list[dict] | None:
            found = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
            return found if found and all(r["health"] == "ok" for r in found) else None
        loaded = poll_until(rules, WAIT, f"alerts.yml's rules were not all healthy: {prom.api('rules')}",
                            interval=0.5)
        groups = prom.api("rules")["groups"]
        active = sorted((r["name"], r["state"]) for r in loaded if r.get("state", "inactive") != "inactive")
        print(f"  /api/v1/rules: {len(groups)} group(s), {len(loaded)} rule(s), all health ok; active: {active}")
        assert {g["file"] for g in groups} == {str(ALERTS)}
    finally:
        rounds.close()
        exporter.proc.terminate()
        exporter.wait(60)
