"""Bad input a probe found: absurd wall times in a quarantine record (and in any record's time), a huge --nnodes, and a
per-job etcd user's `status` without --run-id. Each gets a clear error naming the key, flag or what to give, and no
crash of the agent, `status` or `events`."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agents import AgentProc, keys_of, wait_logged, wait_records
from etcd_agent.cli.flags import parse_nnodes
from etcd_agent.config import MAX_NODES, EtcdConfig, JobSpec
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.errors import BadKeyData, ConfigError
from etcd_agent.etcd.client import Etcd
from etcd_agent.ops.events import line
from etcd_agent.config import QuarantinePolicy
from etcd_agent.schema.values import Quarantine

ROOT = Path(__file__).resolve().parent.parent
KEY = "/etcd-agent/r/0001/quarantine/a"


@pytest.mark.parametrize("until", ["1e30", "Infinity", "-Infinity", "NaN", "-1", "1" + "0" * 400])
def test_a_quarantine_until_no_calendar_shows_is_bad_data_naming_the_key(until):
    with pytest.raises(BadKeyData) as caught:
        Quarantine.read(KEY, f'{{"v": 1, "node": "a", "until": {until}}}'.encode())
    assert caught.value.key == KEY and "until must be" in str(caught.value)


def test_a_quarantine_failure_time_no_calendar_shows_is_bad_data():
    with pytest.raises(BadKeyData, match=r"failures\[1\] must be a wall time"):
        Quarantine.read(KEY, b'{"v": 1, "node": "a", "failures": [1700000000, 1e300]}')
    assert Quarantine.read(KEY, b'{"v": 1, "node": "a", "until": 1700000000}').until == 1700000000.0


def test_an_events_line_with_a_time_no_calendar_shows_prints_the_number():
    text = line({"event": "quarantined", "node": "a", "until": 1e30, "reason": "r", "revision": 5, "time": 1e300})
    assert text.startswith("1e+300 s after 1970  ") and text.endswith("  until 1e+30 s after 1970: r")


@pytest.mark.parametrize("text", ["1000000000000000000000000", "1:1000000000000000000000000", str(MAX_NODES + 1)])
def test_a_huge_nnodes_is_refused_naming_the_flag(text):
    with pytest.raises(ConfigError, match=f"--nnodes '{text}': the number of nodes must be at most {MAX_NODES}"):
        parse_nnodes(text)
    with pytest.raises(ConfigError, match="--nnodes 1:"):
        JobSpec(1, 10 ** 24, "1", 0)
    assert parse_nnodes(f"1:{MAX_NODES}") == (1, MAX_NODES)


def test_a_huge_nnodes_on_the_command_line_is_one_clear_line():
    got = subprocess.run([sys.executable, "-m", "etcd_agent", "--nnodes", "1000000000000000000000000",
                          "--etcd-endpoints", "127.0.0.1:1", "train.py"], capture_output=True, text=True, timeout=60)
    assert got.returncode == 2
    assert got.stderr.strip() == ("etcd-agent: error: --nnodes '1000000000000000000000000': the number of nodes "
                                  f"must be at most {MAX_NODES} (a round's plan, one etcd value, holds every member)")


@pytest.mark.parametrize("window, cooldown", [(600, math.inf), (math.nan, 600), (600, 1e30)])
def test_a_quarantine_period_no_calendar_shows_is_refused(window, cooldown):
    with pytest.raises(ConfigError, match="--quarantine-window and --quarantine-cooldown must be positive and at most"):
        QuarantinePolicy(1, window, cooldown)


def cli(endpoint: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etcd_agent", *args, "--etcd-endpoints", endpoint],
                          capture_output=True, text=True, timeout=60, **kw)


def strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("until", ["1e30", "Infinity"])
def test_an_absurd_quarantine_holds_the_agent_and_status_and_events_show_it(until, etcd_endpoint, run_id, tmp_path):
    """The agent reads its quarantine record before it joins the round after its failure: it names the key and
    waits for a repair, keeping the job; status and events name the key too, and status --json stays JSON."""
    fail = tmp_path / "fail"
    out = tmp_path / "out"
    out.mkdir()
    agent = AgentProc(etcd_endpoint, run_id, "node-0", tmp_path, [str(out), "--fail-rank", "0", "--fail-when",
                                                                  str(fail)],
                      extra=["--max-restarts", "3", "--quarantine-after", "2"])
    wait_records(out, {(1, 0)}, [agent])
    key = keys_of(run_id).quarantine("node-0")
    etcd = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
    try:
        etcd.put(key, f'{{"v": 1, "node": "node-0", "until": {until}, "reason": "planted"}}'.encode())
    finally:
        etcd.close()
    fail.touch()
    said = f"bad data in etcd key {key}: until must be"

    wait_logged(agent, said)  # the agent names the bad quarantine key
    assert agent.proc.poll() is None, f"the agent exited {agent.proc.returncode}:\n{agent.stderr()[-3000:]}"
    status = cli(etcd_endpoint, "status", "--run-id", run_id)
    assert status.returncode == 0 and f"unreadable: {said}" in status.stdout, status.stdout + status.stderr
    as_json = cli(etcd_endpoint, "status", "--run-id", run_id, "--json")
    assert as_json.returncode == 0, as_json.stderr
    state = strict_json(as_json.stdout)
    assert state["quarantined"] == {} and any(said in p for p in state["problems"])
    events = cli(etcd_endpoint, "events", "--run-id", run_id)
    assert events.returncode == 0 and re.search(r"  failure +node-0 +round 1: rank 0 ", events.stdout), events.stderr
    events = cli(etcd_endpoint, "events", "--run-id", run_id, "--json")
    assert events.returncode == 0, events.stderr
    assert "failure" in [strict_json(text)["event"] for text in events.stdout.splitlines()]
    assert agent.proc.poll() is None
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait(30) == 128 + signal.SIGTERM
    assert "Traceback" not in agent.stderr() and "OverflowError" not in agent.stderr()


@pytest.mark.skipif(not shutil.which("openssl") or not shutil.which("etcd"), reason="needs openssl and etcd")
def test_a_per_job_users_status_without_run_id_says_to_give_it(pki, run_id, tmp_path):
    from tls import PASSWORD, TlsEtcd

    server = TlsEtcd(pki, name="auth").start()
    try:
        server.enable_auth()
        pw = tmp_path / "job-password"
        pw.write_text("job-secret\n")
        env = {**os.environ, "ETCDCTL_ENDPOINTS": f"https://{server.endpoint}", "ETCDCTL_CACERT": pki.path("ca.pem"),
               "ETCDCTL_USER": f"root:{PASSWORD}"}
        made = subprocess.run([str(ROOT / "deploy" / "etcd-job-user.sh"), run_id, str(pw)], capture_output=True,
                              text=True, timeout=60, env=env)
        assert made.returncode == 0, made.stderr
        got = cli(server.endpoint, "status", "--etcd-cacert", pki.path("ca.pem"), "--etcd-user", f"job-{run_id}",
                  "--etcd-password-file", str(pw))
        assert got.returncode == 2, got.stderr
        assert "PERMISSION_DENIED" in got.stderr, got.stderr
        assert ("without --run-id, status lists every run under /etcd-agent/, which this etcd user may not read (a "
                "per-job user may read only its own run's keys, /etcd-agent/RUN_ID/): give --run-id RUN_ID") \
            in got.stderr, got.stderr
    finally:
        server.stop()
