"""``etcd-agent doctor``: a launch's command line checked on this node against a real etcd (plain, TLS with a wrong
CA, unreachable), a run held by a running agent, flag errors; and that it writes nothing to etcd."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from agents import AgentProc, wait_all, wait_records
from etcd_agent.config import EtcdConfig
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.etcd.client import Etcd
from tls import HAVE_OPENSSL, TlsEtcd

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text("print('hello')\n")
    return path


def doctor(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etcd_agent", "doctor", *argv], capture_output=True, text=True,
                          timeout=60, cwd=cwd, stdin=subprocess.DEVNULL)


def lines(got: subprocess.CompletedProcess, level: str) -> list[str]:
    """The check lines of one level (``ok``, ``warn``, ``FAIL``, ``skip``), without the level."""
    return [line.strip()[len(level):].strip() for line in got.stdout.splitlines()
            if line.startswith(f"  {level} ")]


def revision(endpoint: str) -> int:
    etcd = Etcd(EtcdConfig(parse_endpoints(endpoint)))
    try:
        return etcd.get("/")[1]
    finally:
        etcd.close()


def test_a_healthy_node_passes_with_every_check_named(etcd_endpoint, run_id, script):
    got = doctor("--nnodes", "1", "--nproc-per-node", "2", "--etcd-endpoints", etcd_endpoint, "--run-id", run_id,
                 str(script), "--lr", "3e-4")
    assert got.returncode == 0, got.stdout + got.stderr
    out = got.stdout
    for row in ("run id", "etcd", "nodes", "workers per node", "node id", "local address", "worker command",
                "interpreter"):
        assert f"\n  {row} " in out, out
    assert f"{run_id}\n" in out and f"{sys.executable} -u {script} --lr 3e-4" in out
    for name in (f"etcd {etcd_endpoint}: etcd 3.", "clock: within", f"run id {run_id}: no job of this run",
                 "local address: ", "master port: a free port binds", f"entrypoint: training script {script} found",
                 "torch: torch "):
        assert [line for line in lines(got, "ok") + lines(got, "warn") if line.startswith(name)], (name, out)
    assert not lines(got, "FAIL") and "ready to launch: no check failed" in out, out


def test_an_unreachable_endpoint_fails_naming_it(etcd_endpoint, run_id, script):
    got = doctor("--nnodes", "1", "--etcd-endpoints", f"{etcd_endpoint},127.0.0.1:1", "--run-id", run_id,
                 "--etcd-timeout", "30", str(script))
    assert got.returncode == 1, got.stdout + got.stderr
    failed = lines(got, "FAIL")
    assert failed == ["etcd 127.0.0.1:1: connection refused: nothing listens at 127.0.0.1:1; start etcd there, or "
                      "fix --etcd-endpoints (etcd's client port is 2379)"], got.stdout
    assert [line for line in lines(got, "warn") + lines(got, "ok") if line.startswith(f"etcd {etcd_endpoint}")]
    assert "1 check failed" in got.stdout


def test_only_unreachable_endpoints_skip_what_needs_etcd(run_id, script):
    got = doctor("--nnodes", "1", "--etcd-endpoints", "127.0.0.1:1", "--run-id", run_id, str(script))
    assert got.returncode == 1, got.stdout + got.stderr
    assert lines(got, "skip") == ["clock: no etcd endpoint answered", f"run id {run_id}: no etcd endpoint answered"]


@pytest.mark.skipif(not HAVE_OPENSSL or not shutil.which("etcd"), reason="needs openssl and etcd")
def test_a_tls_etcd_with_the_wrong_ca_fails_naming_the_file(pki, run_id, script):
    server = TlsEtcd(pki, name="doctor-tls").start()
    try:
        wrong = doctor("--nnodes", "1", "--etcd-endpoints", server.endpoint, "--etcd-cacert", pki.path("otherca.pem"),
                       "--run-id", run_id, str(script))
        right = doctor("--nnodes", "1", "--etcd-endpoints", server.endpoint, "--etcd-cacert", pki.path("ca.pem"),
                       "--run-id", run_id, str(script))
    finally:
        server.stop()
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert lines(wrong, "FAIL") == [f"etcd {server.endpoint}: TLS with etcd at {server.endpoint} failed: etcd's "
                                    f"certificate is not signed by a CA in --etcd-cacert {pki.path('otherca.pem')} "
                                    "(unknown CA)"], wrong.stdout
    assert right.returncode == 0, right.stdout + right.stderr
    assert f"over TLS (CA {pki.path('ca.pem')})" in right.stdout
    assert [line for line in lines(right, "ok") if line.startswith("clock: within")], right.stdout


def test_a_multi_node_job_on_a_loopback_address_fails(etcd_endpoint, run_id, script):
    got = doctor("--nnodes", "2:4", "--etcd-endpoints", etcd_endpoint, "--run-id", run_id, "--local-addr",
                 "127.0.0.1", str(script))
    assert got.returncode == 1, got.stdout + got.stderr
    assert lines(got, "FAIL") == ["local address: --local-addr 127.0.0.1 resolves to 127.0.0.1, loopback: the other "
                                  "nodes of this --nnodes 2:4 job cannot reach this node there (nor its workers' "
                                  "MASTER_ADDR); give --local-addr with this node's address on the cluster network"]
    one = doctor("--nnodes", "1", "--etcd-endpoints", etcd_endpoint, "--run-id", run_id, "--local-addr", "127.0.0.1",
                 str(script))
    assert one.returncode == 0 and "(loopback: enough for a one-node job)" in one.stdout, one.stdout


def test_a_run_id_held_by_a_running_job_warns_and_writes_nothing(etcd_endpoint, run_id, script, tmp_path):
    release, out = tmp_path / "release", tmp_path / "out"
    out.mkdir()
    agent = AgentProc(etcd_endpoint, run_id, "held-node", tmp_path, [str(out), "--run-until", str(release)])
    try:
        wait_records(out, {(1, 0)}, [agent], timeout=60)  # its worker runs: round 1 of job 1
        before = revision(etcd_endpoint)
        got = doctor("--nnodes", "1", "--etcd-endpoints", etcd_endpoint, "--run-id", run_id, str(script))
        after = revision(etcd_endpoint)
    finally:
        release.touch()
    assert wait_all([agent]) == [0], agent.stderr()[-3000:]
    assert got.returncode == 0, got.stdout + got.stderr
    held = [line for line in lines(got, "warn") if line.startswith(f"run id {run_id}: job 1 of this run is running")]
    assert held and "1 registered node(s), held-node: a launch here joins it" in held[0], got.stdout
    assert f"etcd-agent stop --run-id {run_id} --etcd-endpoints {etcd_endpoint}" in held[0]
    assert after == before  # read only: etcd's revision did not move


def test_an_abandoned_job_is_left_as_it_is(etcd_endpoint, run_id, script, tmp_path):
    """``status`` ends a job nobody is left in; doctor only says that a launch would."""
    from etcd_agent.config import JobSpec
    from etcd_agent.coord import txns
    from etcd_agent.schema.keys import RunKeys

    etcd = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
    try:
        txns.init_job(etcd, RunKeys("/etcd-agent", run_id), JobSpec(1, 1, "1", 0), 0.0)
    finally:
        etcd.close()
    before = revision(etcd_endpoint)
    got = doctor("--nnodes", "1", "--etcd-endpoints", etcd_endpoint, "--run-id", run_id, str(script))
    assert revision(etcd_endpoint) == before
    assert got.returncode == 0, got.stdout + got.stderr
    assert f"run id {run_id}: job 1 of this run has no result and no live node (abandoned)" in got.stdout
    mismatch = doctor("--nnodes", "1", "--max-restarts", "3", "--etcd-endpoints", etcd_endpoint, "--run-id", run_id,
                      str(script))
    assert mismatch.returncode == 1 and "--max-restarts is 3 here but 0 in the running job" in mismatch.stdout


@pytest.mark.parametrize("argv, message", [
    (["--nnodes", "2", "--etcd-endpoints", "127.0.0.1:1", "--bogus-flag", "x", "train.py"],
     "etcd-agent: error: unrecognized argument --bogus-flag; `etcd-agent doctor --help` lists every flag"),
    (["--nnodes", "2:x", "--etcd-endpoints", "127.0.0.1:1", "train.py"], "etcd-agent: error: --nnodes"),
    (["--nnodes", "2", "train.py"], "etcd-agent: error: --nnodes 2 is a multi-node job"),
])
def test_a_flag_error_is_one_line_and_exit_2(argv, message, tmp_path):
    got = doctor(*argv, cwd=tmp_path)
    assert got.returncode == 2, got.stdout + got.stderr
    assert got.stdout == "" and got.stderr.count("\n") == 1 and got.stderr.startswith(message), got.stderr


def test_a_missing_script_and_gpu_are_checks_not_flag_errors(run_id, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    got = doctor("--standalone", "--nproc-per-node", "gpu", "missing.py", cwd=tmp_path)
    assert got.returncode == 1, got.stdout + got.stderr
    failed = lines(got, "FAIL")
    assert f"entrypoint: training script 'missing.py' not found (in {tmp_path})" in failed, got.stdout
    assert [f for f in failed if f.startswith("GPUs: --nproc-per-node gpu: no visible GPU (CUDA_VISIBLE_DEVICES=)")]
    assert "embedded etcd" in got.stdout and [line for line in lines(got, "ok") if line.startswith("etcd binary: ")]


def test_a_worker_interpreter_without_torch_fails_with_the_fix(run_id, script, tmp_path, monkeypatch):
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if bare is None or subprocess.run([bare, "-c", "import importlib.util, sys; "
                                       "sys.exit(importlib.util.find_spec('torch') is not None)"]).returncode:
        pytest.skip("no system python3 without torch")
    monkeypatch.setenv("PYTHON_EXEC", bare)
    got = doctor("--standalone", str(script))
    assert got.returncode == 1, got.stdout + got.stderr
    assert [f for f in lines(got, "FAIL") if f.startswith(f"torch: the workers' interpreter {bare} (Python ")
            and "cannot import torch: pip install torch into the environment the agent runs in" in f], got.stdout


def test_doctor_is_listed_in_help():
    got = subprocess.run([sys.executable, "-m", "etcd_agent", "--help"], capture_output=True, text=True, timeout=60)
    assert "etcd-agent doctor" in " ".join(got.stdout.split())


@pytest.mark.parametrize("version, level", [("3.3.27", "FAIL"), ("3.4.23", "warn"), ("3.4.28", "ok"),
                                            ("3.5.10", "warn"), ("3.5.11", "ok"), ("3.6.0", "ok"), ("odd", "warn")])
def test_etcd_versions_are_judged_by_the_readme_s_advice(version, level):
    from etcd_agent.cli.preflight_etcd import version_verdict

    assert version_verdict(version)[0].value == level


@pytest.mark.parametrize("offset, said", [(0.0, "within 1 s of etcd"), (10.0, "10 s ahead of etcd"),
                                          (-10.0, "10 s behind etcd")])
def test_clock_skew_is_read_from_etcd_s_date_header(etcd_endpoint, monkeypatch, offset, said):
    """This node's clock moved by ``offset`` against a real etcd: above 2 s a warning says which way and why."""
    import time as real

    from etcd_agent.cli import preflight_etcd

    clock = type("Clock", (), {"time": staticmethod(lambda: real.time() + offset), "monotonic": real.monotonic})
    monkeypatch.setattr(preflight_etcd, "time", clock)
    cfg = EtcdConfig(parse_endpoints(etcd_endpoint))
    got = preflight_etcd.clock(cfg, list(cfg.endpoints))
    assert got.level.value == ("ok" if offset == 0 else "warn") and said in got.text, got.text
    if offset:
        assert "blame" in got.text and "quarantine" in got.text


def test_doctor_never_imports_torch(etcd_endpoint, run_id, script):
    """It looks for torch in the workers' interpreter; the agent's own process never imports it."""
    code = ("import sys; from etcd_agent.cli.main import main; "
            f"rc = main(['doctor', '--etcd-endpoints', {etcd_endpoint!r}, '--run-id', {run_id!r}, {str(script)!r}]); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch', rc)")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert got.stdout.splitlines()[-1] == "no torch 0", got.stdout + got.stderr
    assert "torch: torch " in got.stdout
