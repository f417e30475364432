"""``etcd-agent events --plot FILE``: a real job with a worker crash and a lost node drawn as PNG and SVG; the
layout (history -> drawable items) on histories written by hand; the command without matplotlib (exit 2, which extra
to install), and the agent's and the command line's imports without ``--plot`` (no matplotlib).

``ETCD_AGENT_WRITE_EXAMPLE=1`` makes the real job's test copy its PNG to docs/timeline-example.png.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest

from agents import start_agents, wait_all, wait_records
from etcd_agent.errors import ConfigError
from etcd_agent.ops.timeline import (FAILURE, FORMING, LOST, QUARANTINED, RUNNING, STOPPED, TAKEOVER, file_format,
                                     layout, times)

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def events(endpoint: str, run_id: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etcd_agent", "events", "--etcd-endpoints", endpoint, "--run-id",
                           run_id, *flags], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def crashed_and_lost(etcd_server, tmp_path_factory):
    """A finished job of 3 nodes (--nnodes 2:3, one worker each): rank 1 exits 3 in round 1, node-2's agent and
    workers are SIGKILLed in round 2, round 3 runs on node-0 and node-1 to success (2 of 2 restarts used)."""
    tmp = tmp_path_factory.mktemp("timeline")
    run_id = f"t-timeline-{os.getpid()}"
    release = tmp / "release"
    agents, out = start_agents(3, etcd_server.endpoint, run_id, tmp, ["--fail-rank", "1", "--fail-round", "1",
                               "--run-until", str(release)], nproc=1, nnodes="2:3",
                               extra=["--max-restarts", "2", "--lease-ttl", "3"])
    wait_records(out, {(2, 0), (2, 1), (2, 2)}, agents, timeout=60)
    victim = agents[2]
    for p in [psutil.Process(victim.proc.pid)] + psutil.Process(victim.proc.pid).children(recursive=True):
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass  # a worker already died with its SIGKILLed agent (parent-death signal)
    victim.proc.wait()
    wait_records(out, {(3, 0), (3, 1)}, agents[:2], timeout=60)
    release.touch()
    assert wait_all(agents[:2]) == [0, 0]
    return etcd_server.endpoint, run_id, tmp


@pytest.mark.chaos  # node-2's agent is SIGKILLed
def test_png_of_a_job_with_a_crash_and_a_lost_node(crashed_and_lost):
    endpoint, run_id, tmp = crashed_and_lost
    png = tmp / "out.png"
    done = events(endpoint, run_id, "--plot", str(png))
    assert done.returncode == 0, done.stderr
    assert str(png) in done.stdout
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 800 <= width <= 3000 and 250 <= height <= 2000, (width, height)
    assert 10_000 < len(data) < 2_000_000
    if os.environ.get("ETCD_AGENT_WRITE_EXAMPLE"):
        shutil.copyfile(png, ROOT / "docs" / "timeline-example.png")


@pytest.mark.chaos
def test_svg_of_the_same_job_names_every_node_the_failure_and_the_restarts(crashed_and_lost):
    endpoint, run_id, tmp = crashed_and_lost
    svg = tmp / "out.svg"
    done = events(endpoint, run_id, "--plot", str(svg))
    assert done.returncode == 0, done.stderr
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    text = " ".join(t for el in root.iter() for t in (el.text,) if t)
    for node in ("node-0", "node-1", "node-2"):
        assert node in text
    assert "restart 1 of 2" in text and "restart 2 of 2" in text
    assert "rank 1 exit code 3" in text and "lost in round 2" in text
    assert f"run {run_id}, job 1: succeeded in round 3" in text and "restarts 2 of 2 used" in text


def test_a_suffix_other_than_png_or_svg_or_json_too_is_refused_naming_the_flags(etcd_endpoint, run_id):
    assert file_format("a/b.PNG") == "png" and file_format("t.svg") == "svg"
    with pytest.raises(ConfigError, match=r"--plot x\.pdf"):
        file_format("x.pdf")
    done = events(etcd_endpoint, run_id, "--plot", "history.jpg")
    assert done.returncode == 2 and "--plot history.jpg" in done.stderr and "PNG or SVG" in done.stderr
    done = events(etcd_endpoint, run_id, "--json", "--plot", "history.png")
    assert done.returncode == 2 and "--plot" in done.stderr and "--json" in done.stderr


NO_MATPLOTLIB = ("import sys; sys.modules['matplotlib'] = None; from etcd_agent.cli.main import main; "
                 "sys.exit(main(sys.argv[1:]))")


def test_without_matplotlib_plot_says_which_extra_to_install(etcd_endpoint, run_id, tmp_path):
    picture = tmp_path / "t.png"
    done = subprocess.run([sys.executable, "-c", NO_MATPLOTLIB, "events", "--etcd-endpoints", etcd_endpoint,
                           "--run-id", run_id, "--plot", str(picture)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "pip install 'etcd-agent[plot]'" in done.stderr and "--plot" in done.stderr
    assert "Traceback" not in done.stderr and not picture.exists()


def imported(stderr: str) -> list[str]:
    """The modules ``python -X importtime`` says it imported."""
    return [line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")]


def test_the_agent_and_the_command_line_never_import_matplotlib(etcd_endpoint, run_id, tmp_path):
    """``python -X importtime``: a one-node launch to its end, then ``events`` of it without ``--plot``, and every
    module of the package that a launch or ``events`` may load: none imports matplotlib."""
    launch = subprocess.run([sys.executable, "-X", "importtime", "-m", "etcd_agent", "--etcd-endpoints", etcd_endpoint,
                             "--run-id", run_id, "--nnodes", "1", "--log-dir", str(tmp_path), "--no-python", "true"],
                            capture_output=True, text=True, timeout=60)
    assert launch.returncode == 0, launch.stderr[-3000:]
    replay = subprocess.run([sys.executable, "-X", "importtime", "-m", "etcd_agent", "events", "--etcd-endpoints",
                             etcd_endpoint, "--run-id", run_id], capture_output=True, text=True, timeout=60)
    assert replay.returncode == 0 and "round opened" in replay.stdout, replay.stderr[-3000:]
    code = "import etcd_agent.agent, etcd_agent.cli.main, etcd_agent.ops.status, etcd_agent.ops.timeline"
    modules = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                             timeout=60)
    assert modules.returncode == 0, modules.stderr[-3000:]
    for done, expected in ((launch, "etcd_agent.agent"), (replay, "etcd_agent.ops.events"),
                           (modules, "etcd_agent.ops.timeline")):
        names = imported(done.stderr)
        assert expected in names
        assert not [n for n in names if n.split(".")[0] == "matplotlib"]


# Layout: histories as ``events --json`` prints them, written by hand (times in seconds after 1000).

def ev(event: str, t: float | None, **fields) -> dict:
    return {"event": event, "time": None if t is None else 1000.0 + t, **fields}


def crash_then_loss() -> list[dict]:
    """Round 1 on a, b, c: rank 1 on b fails at 2 s; round 2 on a, b, c: c is lost (its delete has no time); round
    3 on a, b, d (d a spare in c's place) to success; every agent leaves."""
    h = [ev("round opened", 0, round=1), ev("node registered", 0.1, node="a"),
         ev("joined round", 0.1, round=1, node="a"), ev("node registered", 0.2, node="b"),
         ev("joined round", 0.2, round=1, node="b"),
         ev("node registered", 0.3, node="c"), ev("joined round", 0.3, round=1, node="c"),
         ev("plan", 0.4, round=1, members=["a", "b", "c"]), ev("round closed", 0.4, round=1),
         ev("round opened", 2, round=2), ev("restart counted", 2, used=1, max=3),
         ev("failure", 2, round=1, node="b", rank=1, how="exit code 3", message="RuntimeError: boom"),
         ev("node registered", 2.1, node="d")]
    h += [ev("joined round", 2.5 + i / 10, round=2, node=n) for i, n in enumerate("abc")]
    h += [ev("plan", 2.9, round=2, members=["a", "b", "c"]), ev("round closed", 2.9, round=2),
          ev("node gone", None, node="c"), ev("left round", None, round=2, node="c"),
          ev("round opened", 6, round=3), ev("restart counted", 6, used=2, max=3),
          ev("node lost", 6, round=2, node="c", message="lost"), ev("quarantined", 6, node="c", reason="lost twice")]
    h += [ev("joined round", 6.2, round=3, node=n) for n in "adb"]
    h += [ev("plan", 6.5, round=3, members=["a", "b", "d"]), ev("round closed", 6.5, round=3)]
    h += [ev("node finished", 9 + i / 10, round=3, node=n) for i, n in enumerate("abd")]
    h += [ev("job ended", 9.3, round=3), ev("result", 9.3, outcome="succeeded", round=3, reason="all finished")]
    h += [ev("node gone", None, node=n) for n in "abd"]
    return h


def test_times_of_changes_without_one_are_the_next_known_else_the_last():
    assert times([ev("x", None), ev("y", 1), ev("z", None), ev("w", 3), ev("v", None)]) == [1001, 1001, 1003,
                                                                                            1003, 1003]
    assert times([ev("x", None)]) == [None]


def test_layout_has_a_row_per_node_a_line_per_restart_a_marker_per_failure():
    t = layout(crash_then_loss(), "r1", 1)
    assert t.rows == ("a", "b", "c", "d") and t.start_wall == 1000.0 and t.end == pytest.approx(9.3)
    assert [(r.at, r.text) for r in t.restarts] == [(2, "restart 1 of 3"), (6, "restart 2 of 3")]
    assert [(m.node, m.kind) for m in t.marks] == [("b", FAILURE), ("c", LOST), ("c", QUARANTINED), ("d", TAKEOVER)]
    failure, _lost, _q, takeover = t.marks
    assert failure.at == 2 and failure.text == "rank 1 exit code 3: RuntimeError: boom"
    assert takeover.text == "takes over from c" and takeover.at == pytest.approx(6.5)
    assert [(s.label, s.start, s.end) for s in t.rounds] == [("round 1", 0, 2), ("round 2", 2, 6),
                                                             ("round 3", 6, pytest.approx(9.3))]
    assert t.title == "run r1, job 1: succeeded in round 3 \u00b7 restarts 2 of 3 used"


def test_layout_bars_follow_joins_plans_and_ends():
    bars = {(b.node, b.round, b.state): (round(b.start, 3), round(b.end, 3)) for b in layout(crash_then_loss()).bars}
    assert bars[("b", 1, FORMING)] == (0.2, 0.4) and bars[("b", 1, RUNNING)] == (0.4, 2)
    assert bars[("b", 1, STOPPED)] == (2, 2.6)  # until it joined round 2
    assert bars[("c", 2, RUNNING)] == (2.9, 6)  # until the job saw it lost: no stopped bar after it
    assert ("c", 2, STOPPED) not in bars and not any(k[0] == "c" and k[1] == 3 for k in bars)
    assert ("d", 1, FORMING) not in bars and bars[("d", 3, RUNNING)] == (6.5, 9.2)
    assert bars[("a", 3, RUNNING)] == (6.5, 9) and bars[("a", 3, STOPPED)] == (9, 9.3)
    registered = {s.label: (round(s.start, 3), round(s.end, 3)) for s in layout(crash_then_loss()).registered}
    assert registered == {"a": (0.1, 9.3), "b": (0.2, 9.3), "c": (0.3, 6), "d": (2.1, 9.3)}


def test_a_job_without_a_result_says_so_and_still_lays_out():
    h = crash_then_loss()[:9]
    t = layout(h, "r2")
    assert t.title == "run r2: no result yet (round 1) \u00b7 no restart used"
    assert {b.state for b in t.bars if b.node == "a"} == {FORMING, RUNNING}
    assert max(b.end for b in t.bars) == t.end
    assert layout([], "r3").rows == () and layout([], "r3").title == "run r3: no result yet \u00b7 no restart used"
