"""--nnodes and --nproc-per-node: parse_nnodes, resolve_nproc and the GPU/XPU counts it reads from the host;
every invalid value is a ConfigError naming its flag."""

from __future__ import annotations


import pytest

from etcd_agent.cli.flags import parse_nnodes
from etcd_agent.errors import ConfigError
from etcd_agent.node import hostinfo
from etcd_agent.node.hostinfo import resolve_nproc


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
