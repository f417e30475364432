"""Configuration parsing and validation: every invalid value is a ConfigError naming its flag; spec checks."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from etcd_agent import config
from etcd_agent.cli.flags import parse_nnodes
from etcd_agent.config import AgentConfig, EtcdConfig, JobSpec, WorkerConfig
from etcd_agent.endpoints import endpoint_scheme, parse_endpoints
from etcd_agent.errors import EXIT_USAGE, BadKeyData, ConfigError, SpecMismatch
from etcd_agent.schema.keys import Keys
from etcd_agent.schema.values import SpecValue
from etcd_agent.coord.runs import check_spec
from etcd_agent.node import hostinfo
from etcd_agent.node.hostinfo import resolve_nproc

LOCAL = (("127.0.0.1", 2379),)


# --- parse_endpoints -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:2379", (("127.0.0.1", 2379),)),
    ("etcd-1:2379,etcd-2:22379, etcd-3:32379", (("etcd-1", 2379), ("etcd-2", 22379), ("etcd-3", 32379))),
    ("http://10.0.0.5:2379", (("10.0.0.5", 2379),)),
    ("https://etcd.example:2379/", (("etcd.example", 2379),)),
    ("http://a:1,b:2", (("a", 1), ("b", 2))),
    ("https://a:1,HTTPS://b:2", (("a", 1), ("b", 2))),
    ("etcd-1", (("etcd-1", 2379),)),
    ("http://etcd-1", (("etcd-1", 2379),)),
    ("[::1]:2379", (("::1", 2379),)),
    ("[::1]", (("::1", 2379),)),
    ("[fe80::1]:12379", (("fe80::1", 12379),)),
    ("a:2379,,b:2379,", (("a", 2379), ("b", 2379))),
    ("h:65535", (("h", 65535),)),
])
def test_parse_endpoints(text, expected):
    assert parse_endpoints(text) == expected


@pytest.mark.parametrize("text", ["h:abc", "h:", "h:0", "h:65536", "h:-1", "[::1]:x", "[::1]:", "a:2379,b:99999"])
def test_parse_endpoints_bad_port_names_the_flag(text):
    with pytest.raises(ConfigError) as caught:
        parse_endpoints(text)
    assert "--etcd-endpoints" in str(caught.value)
    assert "port" in str(caught.value)
    assert caught.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize("text", ["", " , ", ":2379", "http://:2379"])
def test_parse_endpoints_without_a_host_names_the_flag(text):
    with pytest.raises(ConfigError, match="--etcd-endpoints"):
        parse_endpoints(text)


def test_parse_endpoints_names_the_flag_it_is_given():
    with pytest.raises(ConfigError, match="--rdzv-endpoint"):
        parse_endpoints("h:x", flag="--rdzv-endpoint")


def test_parse_endpoints_ignores_an_upper_case_scheme():
    assert parse_endpoints("HTTP://127.0.0.1:2379") == (("127.0.0.1", 2379),)


@pytest.mark.parametrize("text, scheme", [("a:1", None), ("a:1,http://b:2", "http"), ("https://a:1,https://b", "https"),
                                          ("HTTPS://a", "https")])
def test_endpoint_scheme(text, scheme):
    assert endpoint_scheme(text) == scheme


@pytest.mark.parametrize("text, message", [
    ("ftp://a:1", r"--etcd-endpoints: 'ftp://a:1': the scheme ftp:// is not one etcd speaks; use https://"),
    ("unix://sock", r"the scheme unix:// is not one etcd speaks"),
    ("http://a:1,https://b:2", r"mixes https:// with plaintext endpoints"),
    ("https://a:1,b:2", r"mixes https:// with plaintext endpoints"),
])
def test_other_schemes_are_usage_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_endpoints(text)


def _ns(**kw):
    import argparse

    return argparse.Namespace(**{"cacert": None, "cert": None, "key": None, "user": None, "password_file": None,
                                 "etcd_timeout": 10.0, **kw})


def test_https_means_tls_with_the_system_cas():
    from etcd_agent.cli.launch import etcd_config

    cfg = etcd_config(_ns(), "https://etcd.example:2379")
    assert cfg.secure and cfg.tls and cfg.ca_cert is None
    assert cfg.describe() == "TLS (the system's CA bundle), no password auth"
    assert etcd_config(_ns(), "etcd.example:2379").describe() == "plaintext (no TLS), no password auth"
    assert not etcd_config(_ns(), "http://etcd.example:2379").secure


def test_http_with_a_ca_is_a_contradiction():
    from etcd_agent.cli.launch import etcd_config

    with pytest.raises(ConfigError, match="http:// means plaintext, but --etcd-cacert asks for TLS"):
        etcd_config(_ns(cacert=__file__), "http://etcd.example:2379")


def test_password_auth_over_https_needs_no_ca_file(monkeypatch):
    from etcd_agent.cli.launch import etcd_config

    monkeypatch.setenv("ETCD_AGENT_ETCD_PASSWORD", "pw")
    cfg = etcd_config(_ns(user="root"), "https://etcd.example:2379")
    assert cfg.user == "root" and cfg.password == "pw"
    assert cfg.describe() == "TLS (the system's CA bundle), password auth as user root"
    with pytest.raises(ConfigError, match="--etcd-user needs TLS"):
        etcd_config(_ns(user="root"), "etcd.example:2379")


def test_parse_endpoints_superscript_port_is_a_config_error():
    with pytest.raises(ConfigError, match="--etcd-endpoints"):
        parse_endpoints("h:²")


# --- parse_nnodes ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("2", (2, 2)), ("1:4", (1, 4)), ("3:3", (3, 3)), (" 2 ", (2, 2))])
def test_parse_nnodes(text, expected):
    assert parse_nnodes(text) == expected


@pytest.mark.parametrize("text, detail", [
    ("3:2", "below the minimum"),
    ("0", "at least 1"),
    ("0:4", "at least 1"),
    ("a:b", "whole numbers"),
    ("1:2:3", "whole numbers"),
    ("", "whole numbers"),
    ("-1:2", "whole numbers"),
    ("1.5", "whole numbers"),
])
def test_parse_nnodes_errors_name_the_flag(text, detail):
    with pytest.raises(ConfigError) as caught:
        parse_nnodes(text)
    assert "--nnodes" in str(caught.value)
    assert detail in str(caught.value)


def test_parse_nnodes_superscript_is_a_config_error():
    with pytest.raises(ConfigError, match="--nnodes"):
        parse_nnodes("²")


def test_resolve_nproc_superscript_is_a_config_error():
    with pytest.raises(ConfigError, match="--nproc-per-node"):
        resolve_nproc("²")


# --- resolve_nproc / count_gpus --------------------------------------------------------------------------------

def _no_driver_gpus(monkeypatch, tmp_path, smi: int = 0) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(hostinfo, "Path", lambda _path: tmp_path / "no-such-dir")
    monkeypatch.setattr(hostinfo, "_nvidia_smi_count", lambda: smi)


def test_resolve_nproc_number():
    assert resolve_nproc("4") == 4
    assert resolve_nproc(" 8 ") == 8


@pytest.mark.parametrize("text", ["0", "00"])
def test_resolve_nproc_zero_names_the_flag(text):
    with pytest.raises(ConfigError, match="--nproc-per-node must be at least 1"):
        resolve_nproc(text)


@pytest.mark.parametrize("text", ["x", "-1", "2.5", "gpus", ""])
def test_resolve_nproc_unknown_names_the_flag(text):
    with pytest.raises(ConfigError) as caught:
        resolve_nproc(text)
    assert "--nproc-per-node" in str(caught.value)


def test_resolve_nproc_cpu(monkeypatch):
    monkeypatch.setattr(hostinfo.os, "cpu_count", lambda: 6)
    assert resolve_nproc("cpu") == 6
    assert resolve_nproc("CPU") == 6


def test_resolve_nproc_gpu_counts_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert resolve_nproc("gpu") == 2


def test_resolve_nproc_gpu_with_no_visible_device_names_the_flag(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError) as caught:
        resolve_nproc("gpu")
    assert "--nproc-per-node" in str(caught.value)
    assert "no visible GPU" in str(caught.value)


def test_resolve_nproc_gpu_on_a_machine_without_gpus(monkeypatch, tmp_path):
    _no_driver_gpus(monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match="--nproc-per-node"):
        resolve_nproc("gpu")


@pytest.mark.parametrize("gpus, expected", [(0, 6), (3, 3)])
def test_resolve_nproc_auto_prefers_gpus_else_cpus(monkeypatch, gpus, expected):
    monkeypatch.setattr(hostinfo, "count_gpus", lambda: gpus)
    monkeypatch.setattr(hostinfo.os, "cpu_count", lambda: 6)
    assert resolve_nproc("auto") == expected


@pytest.mark.parametrize("visible, expected", [("0,1", 2), ("3", 1), ("", 0), ("0,-1,1", 1), ("-1", 0),
                                               ("GPU-aaa,GPU-bbb", 2), ("0, 1,", 2)])
def test_count_gpus_follows_cuda_visible_devices(monkeypatch, visible, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(hostinfo, "_nvidia_smi_count", lambda: pytest.fail("nvidia-smi asked although the env wins"))
    assert hostinfo.count_gpus() == expected


def test_count_gpus_reads_the_driver_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for bus in ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"):
        (tmp_path / bus).mkdir()
    monkeypatch.setattr(hostinfo, "Path", lambda _path: tmp_path)
    assert hostinfo.count_gpus() == 3


def test_count_gpus_falls_back_to_nvidia_smi(monkeypatch, tmp_path):
    _no_driver_gpus(monkeypatch, tmp_path, smi=4)
    assert hostinfo.count_gpus() == 4


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


@pytest.mark.parametrize("text", ["h:2379:1", "[::1", "[::1]2379"])
def test_parse_endpoints_rejects_malformed_hosts(text):
    with pytest.raises(ConfigError, match="--etcd-endpoints"):
        parse_endpoints(text)


def test_parse_endpoints_accepts_a_bare_ipv6_address():
    assert parse_endpoints("::1") == (("::1", 2379),)


def test_count_xpus_follows_ze_affinity_mask(monkeypatch, tmp_path):
    from etcd_agent.node.hostinfo import count_xpus

    monkeypatch.setenv("ZE_AFFINITY_MASK", "0,1.0,1.1,3")
    assert count_xpus(str(tmp_path)) == 3  # devices 0, 1 (two tiles) and 3


def test_count_xpus_reads_intel_render_nodes(monkeypatch, tmp_path):
    from etcd_agent.node.hostinfo import count_xpus

    monkeypatch.delenv("ZE_AFFINITY_MASK", raising=False)
    for name, vendor in (("renderD128", "0x8086"), ("renderD129", "0x10de"), ("renderD130", "0x8086")):
        (tmp_path / name / "device").mkdir(parents=True)
        (tmp_path / name / "device" / "vendor").write_text(vendor + "\n")
    (tmp_path / "card0").mkdir()
    assert count_xpus(str(tmp_path)) == 2
    assert count_xpus(str(tmp_path / "missing")) == 0


def test_resolve_nproc_xpu_without_a_device_names_the_flag(monkeypatch):
    monkeypatch.setenv("ZE_AFFINITY_MASK", "")
    with pytest.raises(ConfigError, match="--nproc-per-node xpu"):
        resolve_nproc("xpu")


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
