"""Configuration validation (JobSpec, WorkerConfig, EtcdConfig, AgentConfig: every invalid value is a ConfigError
naming its flag), spec checks, and the timings derived from the lease TTL."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from etcd_agent import config
from etcd_agent.config import AgentConfig, EtcdConfig, JobSpec, WorkerConfig
from etcd_agent.errors import EXIT_USAGE, BadKeyData, ConfigError, SpecMismatch
from etcd_agent.schema.keys import Keys
from etcd_agent.schema.values import SpecValue
from etcd_agent.coord.runs import check_spec

LOCAL = (("127.0.0.1", 2379),)


# --- JobSpec / WorkerConfig / EtcdConfig / AgentConfig ---------------------------------------------------------

@pytest.mark.parametrize("kwargs, flag", [
    (dict(min_nodes=0, max_nodes=2), "--nnodes"),
    (dict(min_nodes=3, max_nodes=2), "--nnodes"),
    (dict(max_restarts=-1), "--max-restarts"),
])
def test_job_spec_validation_names_the_flag(kwargs, flag):
    values = dict(min_nodes=1, max_nodes=2, nproc_per_node="1", max_restarts=0) | kwargs
    with pytest.raises(ConfigError, match=flag):
        JobSpec(**values)


def test_job_spec_as_stored():
    assert SpecValue.of(JobSpec(2, 4, "gpu", 3)).to_json() == {"min_nodes": 2, "max_nodes": 4, "nproc_per_node": "gpu",
                                                               "max_restarts": 3}


@pytest.mark.parametrize("kwargs, flag", [
    (dict(nproc=0), "--nproc-per-node"),
    (dict(stop_timeout=-0.5), "--stop-timeout"),
    (dict(module=True, no_python=True), "--no-python"),
    (dict(module=True, no_python=True), "-m/--module"),
])
def test_worker_config_validation_names_the_flag(kwargs, flag):
    with pytest.raises(ConfigError) as caught:
        WorkerConfig(**(dict(entrypoint="train.py", args=(), nproc=1) | kwargs))
    assert flag in str(caught.value)


def test_worker_command_for_a_script():
    w = WorkerConfig("train.py", ("--lr", "3e-4"), 2, python="python3.x")
    assert w.command() == ["python3.x", "-u", "train.py", "--lr", "3e-4"]


def test_worker_command_for_a_module():
    w = WorkerConfig("pkg.train", ("--epochs", "1"), 2, module=True, python="python3.x")
    assert w.command() == ["python3.x", "-u", "-m", "pkg.train", "--epochs", "1"]


def test_worker_command_without_python(monkeypatch):
    monkeypatch.setenv("PYTHON_EXEC", "python-from-env")
    w = WorkerConfig("./run.sh", ("a", "b"), 1, no_python=True, python="python3.x")
    assert w.command() == ["./run.sh", "a", "b"]


def test_worker_command_default_interpreter(monkeypatch):
    monkeypatch.delenv("PYTHON_EXEC", raising=False)
    assert WorkerConfig("train.py", (), 1).command() == [sys.executable, "-u", "train.py"]
    monkeypatch.setenv("PYTHON_EXEC", "python-from-env")
    assert WorkerConfig("train.py", (), 1).command() == ["python-from-env", "-u", "train.py"]
    assert WorkerConfig("train.py", (), 1, python="explicit").command()[0] == "explicit"


def test_etcd_config_needs_an_endpoint():
    with pytest.raises(ConfigError, match="--etcd-endpoints"):
        EtcdConfig(())


def test_etcd_config_cert_without_key(tmp_path):
    cert = tmp_path / "client.crt"
    cert.write_text("x")
    with pytest.raises(ConfigError) as caught:
        EtcdConfig(LOCAL, cert=str(cert))
    assert "--etcd-cert" in str(caught.value) and "--etcd-key" in str(caught.value)
    with pytest.raises(ConfigError, match="--etcd-key"):
        EtcdConfig(LOCAL, key=str(cert))


def test_etcd_config_missing_files_name_flag_and_path(tmp_path):
    missing = str(tmp_path / "missing-ca.pem")
    with pytest.raises(ConfigError) as caught:
        EtcdConfig(LOCAL, ca_cert=missing)
    assert "--etcd-cacert" in str(caught.value) and missing in str(caught.value)
    present = tmp_path / "client.crt"
    present.write_text("x")
    with pytest.raises(ConfigError, match="--etcd-key"):
        EtcdConfig(LOCAL, cert=str(present), key=str(tmp_path / "missing.key"))


def test_etcd_config_user_needs_a_password():
    with pytest.raises(ConfigError, match="--etcd-user"):
        EtcdConfig(LOCAL, user="alice")


def test_etcd_config_reads_its_tls_files(tmp_path):
    """Files that are not PEM are refused at once, naming the flag and the file (real certificates: test_secure)."""
    for name in ("ca.pem", "c.crt", "c.key"):
        (tmp_path / name).write_text("x")
    with pytest.raises(ConfigError, match=f"--etcd-cacert {tmp_path / 'ca.pem'}: not a PEM certificate bundle"):
        EtcdConfig(LOCAL, str(tmp_path / "ca.pem"), str(tmp_path / "c.crt"), str(tmp_path / "c.key"))
    assert not EtcdConfig(LOCAL).secure


def _agent(**kwargs) -> AgentConfig:
    values = dict(run_id="job1", node_id="node-a", spec=JobSpec(1, 2, "1", 0),
                  workers=WorkerConfig("train.py", (), 1), etcd=EtcdConfig(LOCAL)) | kwargs
    return AgentConfig(**values)


def test_agent_config_defaults_are_valid():
    cfg = _agent(local_addr="10.1.2.3")
    assert cfg.root == "/etcd-agent"
    assert cfg.address == "10.1.2.3"


@pytest.mark.parametrize("kwargs, flag", [
    (dict(run_id="job/1"), "--run-id"),
    (dict(run_id="job 1"), "--run-id"),
    (dict(run_id=""), "--run-id"),
    (dict(run_id="-job"), "--run-id"),
    (dict(run_id="j" * 129), "--run-id"),
    (dict(run_id="job\n"), "--run-id"),  # it would land in keys and log paths
    (dict(node_id="node-a\n"), "--node-id"),
    (dict(node_id=""), "--node-id"),
    (dict(node_id="node/a"), "--node-id"),
    (dict(root="etcd-agent"), "--etcd-prefix"),
    (dict(root="/etcd-agent/"), "--etcd-prefix"),
    (dict(root="/a//b"), "--etcd-prefix"),
    (dict(lease_ttl=1), "--lease-ttl"),
    (dict(last_call=-1), "--last-call"),
    (dict(join_timeout=0), "--join-timeout"),
    (dict(join_timeout=-5), "--join-timeout"),
    (dict(scale_settle=-1), "--scale-settle"),
    (dict(lease_ttl=3, etcd=EtcdConfig(LOCAL, request_timeout=3.0)), "--lease-ttl"),
    (dict(lease_ttl=2, etcd=EtcdConfig(LOCAL, request_timeout=1.5)), "fencing margin"),
    (dict(last_call=float("nan")), "--last-call"),
    (dict(join_timeout=float("nan")), "--join-timeout"),
    (dict(worker_timeout=float("nan")), "--worker-timeout"),
])
def test_agent_config_validation_names_the_flag(kwargs, flag):
    with pytest.raises(ConfigError) as caught:
        _agent(**kwargs)
    assert flag in str(caught.value)


def test_agent_config_accepts_edge_values():
    cfg = _agent(run_id="a" * 128, node_id="n.1_x-2", root="/jobs/team-a", lease_ttl=2,
                 etcd=EtcdConfig(LOCAL, request_timeout=1.0), last_call=0, scale_settle=0)
    assert cfg.lease_ttl == 2 and cfg.timings.fence_margin == 1.0  # one request fits before fencing, exactly


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _agent().lease_ttl = 10


# --- runs.check_spec -------------------------------------------------------------------------------------------

KEYS = Keys("/etcd-agent", "job1", 1)
SPEC = JobSpec(2, 4, "gpu", 3)
STORED = SpecValue.of(SPEC).to_json()


def test_check_spec_identical_passes():
    check_spec(KEYS, SPEC, {"v": 1, **STORED})
    check_spec(KEYS, SPEC, {"v": 1, **STORED, "extra": "ignored"})


@pytest.mark.parametrize("field, value, flag", [
    ("min_nodes", 1, "--nnodes (minimum)"),
    ("max_nodes", 8, "--nnodes (maximum)"),
    ("nproc_per_node", "8", "--nproc-per-node"),
    ("max_restarts", 0, "--max-restarts"),
])
def test_check_spec_each_difference_names_its_flag(field, value, flag):
    stored = {"v": 1, **STORED, field: value}
    with pytest.raises(SpecMismatch) as caught:
        check_spec(KEYS, SPEC, stored)
    message = str(caught.value)
    assert flag in message
    assert repr(value) in message and repr(STORED[field]) in message
    assert "job1" in message and KEYS.spec() in message
    assert isinstance(caught.value, ConfigError) and caught.value.exit_code == EXIT_USAGE


def test_check_spec_lists_every_difference():
    stored = {"v": 1, "min_nodes": 1, "max_nodes": 8, "nproc_per_node": "gpu", "max_restarts": 3}
    with pytest.raises(SpecMismatch) as caught:
        check_spec(KEYS, SPEC, stored)
    assert "--nnodes (minimum)" in str(caught.value) and "--nnodes (maximum)" in str(caught.value)
    assert "--max-restarts" not in str(caught.value)


def test_check_spec_ends_with_the_fix_for_this_run_s_prefix():
    stored = {"v": 1, **STORED, "max_restarts": 0}
    with pytest.raises(SpecMismatch, match=r"; to start a new job with these flags, stop that one \(`etcd-agent stop "
                                           r"--run-id job1 --etcd-endpoints e1:2379,e2:2379`\) or give another "
                                           r"--run-id$"):
        check_spec(KEYS, SPEC, stored, "e1:2379,e2:2379")
    with pytest.raises(SpecMismatch, match=r"--run-id job1 --etcd-endpoints e1:2379 --etcd-prefix /jobs`\)"):
        check_spec(Keys("/jobs", "job1", 1), SPEC, stored, "e1:2379")


@pytest.mark.parametrize("missing", ["min_nodes", "max_nodes", "nproc_per_node", "max_restarts"])
def test_check_spec_stored_spec_missing_fields_is_bad_data(missing):
    stored = {"v": 1, **STORED}
    del stored[missing]
    with pytest.raises(BadKeyData) as caught:
        check_spec(KEYS, SPEC, stored)
    assert caught.value.key == KEYS.spec()
    assert missing in str(caught.value)


@pytest.mark.parametrize("ttl", [2, 3, 5, 10, 60])
def test_the_default_request_timeout_fits_every_lease_ttl(ttl):
    t = config.Timings(ttl)
    assert t.request_timeout == config.request_timeout_for(ttl)
    for members in (1, 3):  # a missed keepalive is retried before fencing
        period, attempt, retry, pause = t.keepalive(members)
        assert period < t.lease_ttl - t.fence_margin and retry <= attempt < period and pause < period
    assert t.keepalive(3).period <= t.keepalive(1).period  # several members: never slower than one
    assert 0 <= t.fence_grace < t.fence_margin


@pytest.mark.parametrize("ttl", [5, 6, 7, 10, 30, 60])
def test_several_members_keep_a_session_through_a_frozen_leaders_election(ttl):
    """The worst case of ``etcd/session.py``: a freeze just before a keepalive, etcd's default election (2 s at most),
    the retry in flight then and one on the frozen member lost, a live member's answer: all before the fence."""
    t = config.Timings(ttl)
    period, attempt, retry, _ = t.keepalive(3)
    assert attempt <= config.ELECTION + retry  # an election within the first try: it and one retry are lost, no more
    assert period + config.ELECTION + 2 * retry + config.ANSWER <= t.lease_ttl - t.fence_margin + 1e-9
    worst = period + config.ELECTION + 2 * retry + config.ANSWER
    assert period == pytest.approx(ttl / 3) or worst == pytest.approx(t.lease_ttl - t.fence_margin)  # the longest


def test_an_idle_agent_sends_under_one_request_per_second_at_the_default_ttl():
    """Issue 26's bound, with room: keepalives plus the idle watch's probe (one every 10 probe intervals)."""
    t = config.Timings()
    for members in (1, 3):
        assert 1 / t.keepalive(members).period + 1 / (10 * t.watch_probe) <= 0.95
