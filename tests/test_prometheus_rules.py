"""deploy/prometheus/, checked with promtool (Debian's ``prometheus`` package; tools/setup.sh installs it).

- ``promtool check config`` passes on prometheus.yml (which loads alerts.yml and reads agents/*.json).
- ``promtool check rules`` passes on alerts.yml, and every rule has a severity, a summary, a description and a
  runbook.
- ``promtool test rules`` passes on alerts_test.yml, which tests every alert of alerts.yml.
- grafana-dashboard.json is JSON whose every query parses as PromQL (checked as rules by promtool, with the
  dashboard's variables given values).

Each test skips, saying so, where promtool is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    """Run promtool with ``args`` in ``cwd``; fail the test, with its output, on a non-zero exit."""
    proc = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"promtool {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]


@needs_promtool
def test_config_passes_promtool():
    promtool("check", "config", "prometheus.yml")


@needs_promtool
def test_rules_pass_promtool_and_say_what_to_do():
    promtool("check", "rules", "alerts.yml")
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]


@needs_promtool
def test_rule_unit_tests_pass_and_cover_every_alert():
    out = promtool("test", "rules", "alerts_test.yml")
    assert "SUCCESS" in out.stdout
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert tested == {r["alert"] for r in alert_rules()}


@needs_promtool
def test_dashboard_queries_parse(tmp_path):
    dash = json.loads((PROM / "grafana-dashboard.json").read_text())
    assert [v["name"] for v in dash["templating"]["list"]][:2] == ["datasource", "run"]
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    values = {"run": "demo3", "job": "1"}
    def fill(expr: str) -> str:  # the dashboard's variables; a regex group ($1) stays as it is
        return re.sub(r"\$(\w+)", lambda m: values.get(m.group(1), m.group(0)), expr)
    rules = [{"record": f"dashboard:query{i}", "expr": fill(e)} for i, e in enumerate(exprs)]
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
