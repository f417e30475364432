"""A worker's environment (etcd_agent.node.env): exactly torchrun's variables, what the user set kept, the
virtual local rank, and nothing the agent set for itself inherited; checked against a real torchrun."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from etcd_agent import config
from etcd_agent.config import StdSpec, WorkerConfig
from etcd_agent.errors import ConfigError
from etcd_agent.node.env import worker_env

pytest.register_assert_rewrite("worker_groups")  # a plugin (pytest_plugins): marked before its first import
from worker_groups import TORCHRUN_KEYS, WORKERS, assignment  # noqa: E402

pytest_plugins = ("worker_groups",)  # the fixtures make_group and mailbox


# -- environment -------------------------------------------------------------------------------------------------


def test_worker_env_has_exactly_torchruns_variables():
    cfg = WorkerConfig(entrypoint="train.py", args=(), nproc=2)
    base = {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "1,3", "RANK": "stale"}
    env = worker_env(cfg, assignment(), 1, base, "/logs/error.json")
    assert set(env) - set(base) == (TORCHRUN_KEYS | {"OMP_NUM_THREADS", "ETCD_AGENT_ROUND"}) - {"RANK"}
    assert env == {
        "PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "1,3",
        "RANK": "5", "LOCAL_RANK": "1", "GROUP_RANK": "1", "ROLE_RANK": "5", "ROLE_NAME": "default",
        "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "6", "GROUP_WORLD_SIZE": "2", "ROLE_WORLD_SIZE": "6",
        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400", "TORCHELASTIC_RESTART_COUNT": "2",
        "TORCHELASTIC_MAX_RESTARTS": "5", "TORCHELASTIC_RUN_ID": "run1", "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "OMP_NUM_THREADS": "1", "TORCHELASTIC_ERROR_FILE": "/logs/error.json",
        "ETCD_AGENT_ROUND": "3", "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
    }


def test_worker_env_keeps_what_the_user_set():
    many = WorkerConfig(entrypoint="train.py", args=(), nproc=4)
    one = WorkerConfig(entrypoint="train.py", args=(), nproc=1)
    user = {"OMP_NUM_THREADS": "8", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    assert worker_env(many, assignment(), 0, user, "e")["OMP_NUM_THREADS"] == "8"
    assert worker_env(many, assignment(), 0, user, "e")["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert "OMP_NUM_THREADS" not in worker_env(one, assignment(), 0, {}, "e")
    tee = WorkerConfig(entrypoint="train.py", args=(), nproc=1, tee=StdSpec(3))
    assert "PYTHONUNBUFFERED" not in worker_env(tee, assignment(), 0, {}, "e")  # torchrun never sets it


def test_worker_env_role_and_signals_are_torchruns():
    cfg = WorkerConfig(entrypoint="train.py", args=(), nproc=1, role="trainer", signals_to_handle="SIGUSR1")
    env = worker_env(cfg, assignment(), 0, {"TORCHELASTIC_SIGNALS_TO_HANDLE": "stale"}, "e")
    assert env["ROLE_NAME"] == "trainer"
    assert env["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGUSR1"  # torchrun overwrites it in its own environment


def test_worker_env_virtual_local_rank():
    virtual = WorkerConfig(entrypoint="train.py", args=(), nproc=3, virtual_local_rank=True)
    env = worker_env(virtual, assignment(), 1, {"CUDA_VISIBLE_DEVICES": "4, 6,7"}, "e")
    assert (env["LOCAL_RANK"], env["CUDA_VISIBLE_DEVICES"], env["RANK"]) == ("0", "6", "5")
    env = worker_env(virtual, assignment(), 2, {}, "e")
    assert (env["LOCAL_RANK"], env["CUDA_VISIBLE_DEVICES"]) == ("0", "2")
    with pytest.raises(ConfigError, match=r"local rank 2 .*CUDA_VISIBLE_DEVICES='4,6' lists 2"):
        worker_env(virtual, assignment(), 2, {"CUDA_VISIBLE_DEVICES": "4,6"}, "e")
    plain = WorkerConfig(entrypoint="train.py", args=(), nproc=3)
    env = worker_env(plain, assignment(), 2, {"CUDA_VISIBLE_DEVICES": "4,6"}, "e")
    assert (env["LOCAL_RANK"], env["CUDA_VISIBLE_DEVICES"]) == ("2", "4,6")
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(plain, assignment(), 2, {}, "e")


def test_a_virtual_local_rank_without_a_device_fails_start_before_any_worker_runs(make_group, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    group, exits = make_group("hang.py", nproc=2, virtual_local_rank=True)
    with pytest.raises(ConfigError, match="--virtual-local-rank"):
        group.start(assignment())
    assert group.pids == [] and not group.running and exits.items == []


@pytest.fixture
def grpc_env(monkeypatch):
    """GRPC_ENABLE_FORK_SUPPORT absent and not marked as the agent's own; restored afterwards."""
    name = "GRPC_ENABLE_FORK_SUPPORT"
    was_own = name in config._AGENT_OWN_ENV
    monkeypatch.delenv(name, raising=False)
    config._AGENT_OWN_ENV.discard(name)
    yield name
    config._AGENT_OWN_ENV.discard(name)
    if was_own:
        config._AGENT_OWN_ENV.add(name)


@pytest.mark.parametrize("user_value", [None, "true"])
def test_what_the_agent_set_for_itself_is_not_inherited(make_group, tmp_path, monkeypatch, grpc_env, user_value):
    if user_value is not None:
        monkeypatch.setenv(grpc_env, user_value)
    config.set_agent_env(grpc_env, "false")
    assert os.environ[grpc_env] == (user_value or "false")
    out = tmp_path / "out"
    out.mkdir()
    group, exits = make_group("record_env.py", str(out))
    group.start(assignment())
    exits.wait()
    assert json.loads((out / "env_4.json").read_text())["env"].get(grpc_env) == user_value


@pytest.mark.torch
def test_worker_env_keys_match_a_real_torchrun(tmp_path):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    out = tmp_path / "torchrun"
    out.mkdir()
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "LC_ALL": "C.UTF-8"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(WORKERS / "record_env.py"), str(out)], env=base, check=True, timeout=60,
                   capture_output=True)
    theirs = json.loads((out / "env_1.json").read_text())["env"]
    ours = worker_env(WorkerConfig(entrypoint="x", args=(), nproc=2), assignment(), 1, base, "e")
    assert set(theirs) - set(base) == set(ours) - set(base) - {"ETCD_AGENT_ROUND"}
    shared = {"ROLE_NAME", "TORCHELASTIC_SIGNALS_TO_HANDLE", "LOCAL_RANK", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"}
    assert {k: theirs[k] for k in shared} == {k: ours[k] for k in shared}
