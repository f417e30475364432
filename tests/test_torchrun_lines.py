"""torchrun command lines run under etcd-agent against the real etcd: multi-node c10d-style and etcd-backend lines,
Slurm-style static lines with --node_rank/--master_addr, forwarded signals, missing entrypoints, console output."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from agents import JOB, ROOT, WORKERS, CommandLine, job_keys, records, watch_until

from etcd_agent.proctree import free_port
from etcd_agent.schema.keys import RunKeys
from etcd_agent.testing import records as record_files


def common(tmp_path: Path, node: str) -> list[str]:
    return ["--node-id", node, "--local-addr", "127.0.0.1", "--log-dir", str(tmp_path / "logs"), "--last-call", "1",
            "--stop-timeout", "3"]


def outdir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return out


def test_a_multi_node_c10d_line_runs_with_etcd_endpoints_added(etcd_endpoint, run_id, tmp_path):
    out = outdir(tmp_path)
    c10d = f"127.0.0.1:{free_port()}"  # what the user's line names; nothing listens there
    lines = [CommandLine(["--nnodes", "2", "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", c10d,
                   "--rdzv_id", run_id, "--etcd-endpoints", etcd_endpoint, *common(tmp_path, f"n{i}"), JOB, str(out)],
                  tmp_path, f"n{i}") for i in range(2)]
    assert [line.wait() for line in lines] == [0, 0], lines[0].stderr()[-3000:]
    found = records(out)
    assert sorted(found) == [(1, r) for r in range(4)]
    assert {f["env"]["WORLD_SIZE"] for f in found.values()} == {"4"}
    assert all("is not an etcd endpoint and is not used for coordination" in line.stderr() for line in lines)
    assert not [line for line in lines if "serves the job's etcd" in line.stderr()]  # the explicit etcd wins


def test_an_etcd_v3_line_takes_etcd_from_rdzv_endpoint(etcd_endpoint, run_id, tmp_path):
    out = outdir(tmp_path)
    lines = [CommandLine(["--nnodes", "1:2", "--rdzv-backend", "etcd-v3", spelling, etcd_endpoint, "--rdzv-id", run_id,
                   *common(tmp_path, f"n{i}"), JOB, str(out)], tmp_path, f"n{i}")
             for i, spelling in enumerate(["--rdzv-endpoint", "--rdzv_endpoint"])]
    assert [line.wait() for line in lines] == [0, 0], lines[0].stderr()[-3000:]
    assert sorted(records(out)) == [(1, 0), (1, 1)]


def test_a_slurm_static_line_pins_ranks_and_master(etcd_endpoint, tmp_path):
    out = outdir(tmp_path)
    port = free_port()
    static = ["--nnodes", "2", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
              "--etcd-endpoints", etcd_endpoint]
    # Rank 1 starts first: without the pin it would lead and take group rank 0.
    lines = [CommandLine([*static, "--node_rank", str(rank), *common(tmp_path, f"slurm-{rank}"), JOB, str(out)],
                         tmp_path, f"slurm-{rank}") for rank in (1, 0)]
    assert [line.wait() for line in lines] == [0, 0], lines[0].stderr()[-3000:]
    found = records(out)
    assert sorted(found) == [(1, r) for r in range(4)]
    for (_, rank), facts in found.items():
        env = facts["env"]
        assert env["GROUP_RANK"] == str(rank // 2)
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == str(port)
        assert env["TORCHELASTIC_RUN_ID"] == f"static-127.0.0.1-{port}"
    node_of_rank0 = json.loads((tmp_path / "out" / "1-0.json").read_text())["env"]
    assert node_of_rank0["GROUP_RANK"] == "0"


def test_two_live_nodes_with_one_node_rank_is_a_clear_error(etcd_endpoint, run_id, tmp_path):
    hold = tmp_path / "release"
    static = ["--nnodes", "2", "--node-rank", "0", "--etcd-endpoints", etcd_endpoint, "--rdzv-id", run_id,
              "--lease-ttl", "2"]
    out = outdir(tmp_path)
    first = CommandLine([*static, *common(tmp_path, "a"), JOB, str(out), "--hold", str(hold)], tmp_path, "a")
    watch_until(etcd_endpoint, RunKeys(ROOT, run_id).prefix, lambda keys: any(k.endswith("/nodes/a") for k in keys),
                30, "node a did not register")
    second = CommandLine([*static, *common(tmp_path, "b"), JOB, str(out)], tmp_path, "b")
    assert second.wait() == 2
    err = second.stderr()
    assert "--node-rank 0 is already taken by node a" in err and "Traceback" not in err
    assert first.proc.poll() is None  # the refused agent did not harm the first
    first.kill()


def test_a_handled_signal_is_forwarded_to_the_workers(tmp_path):
    out = outdir(tmp_path)
    line = CommandLine(["--nproc-per-node", "2", "--signals-to-handle", "SIGTERM,SIGUSR1", *common(tmp_path, "sig"),
                 str(WORKERS / "signal_recorder.py"), str(out)], tmp_path, "sig")
    record_files.wait_until(lambda: all((out / f"ready-{r}").exists() for r in (0, 1)), 30, "the workers did not start",
                            out)
    line.proc.send_signal(signal.SIGUSR1)
    assert line.wait() == 128 + signal.SIGUSR1
    assert [(out / f"signal-{r}").read_text() for r in (0, 1)] == ["SIGUSR1", "SIGUSR1"]


def test_a_missing_entrypoint_is_refused_before_anything_starts(etcd_endpoint, run_id, tmp_path):
    for argv, message in ((["nope.py"], "training script 'nope.py' not found"),
                          (["-m", "no_such_module_xyz"], "no module named 'no_such_module_xyz'"),
                          (["--no-python", "no-such-program-xyz"], "'no-such-program-xyz' is not on PATH")):
        line = CommandLine(["--etcd-endpoints", etcd_endpoint, "--rdzv-id", run_id, "--max-restarts", "3", *argv],
                    tmp_path, "missing")
        assert line.wait() == 2
        err = line.stderr().strip()
        assert message in err and err.count("\n") == 0, err
    assert job_keys_or_none(etcd_endpoint, run_id) is None  # nothing was written: no job, no restart spent


def job_keys_or_none(endpoint: str, run_id: str):
    try:
        return job_keys(endpoint, run_id)
    except AssertionError:
        return None


def test_one_node_output_reaches_the_console_by_default(tmp_path):
    line = CommandLine(["--nproc-per-node", "2", *common(tmp_path, "console"), str(WORKERS / "echo.py")], tmp_path,
                       "console")
    assert line.wait() == 0, line.stderr()[-3000:]
    assert line.stdout().count("hello stdout\n") == 2 and "[default" not in line.stdout()
    assert line.stderr().count("hello stderr\n") == 2
