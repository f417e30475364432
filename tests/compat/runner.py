"""Run one catalog line under real torchrun and under etcd-agent, and compare what the workers got.

A run starts the line's launcher process(es) on 127.0.0.1 (one per node; every one with a timeout, its whole process
tree killed when it runs over), with the recording worker (tests/workers/recorder.py) as the training script. Each
worker writes a JSON record (orig_argv, argv, cwd, environment) and prints one marker line to stdout and one to
stderr; the runner then finds every marker: on the launcher's stdout or stderr (plain or behind a prefix such as
``[default0]:``), only in a log file (under the run's --log-dir or its TMPDIR), or nowhere.

``compare(line, torchrun_run, agent_run)`` lists every difference, minus the documented legitimate ones:

* values of MASTER_PORT (ports are chosen at run time), TORCHELASTIC_ERROR_FILE (a temporary path),
  TORCHELASTIC_USE_AGENT_STORE (etcd-agent: False, torchrun's c10d store: True) -- the names must be there;
* TORCHELASTIC_RUN_ID where torchrun generated a uuid (--standalone), and ``static-<addr>-<port>`` where a
  multi-node static line names no --rdzv-id (torchrun: ``none``; etcd-agent derives an id per job);
* under --run-path, the worker's command line (torchrun runs the script through runpy in a multiprocessing child;
  etcd-agent runs ``python -u SCRIPT``); sys.argv must still match;
* the stderr of a rank hidden by --local-ranks-filter: torchrun discards it, etcd-agent keeps it in stderr.log for
  its failure reports (the console is the same);
* ETCD_AGENT_* variables etcd-agent adds;
* the harness's own: COMPAT_* variables and the TMPDIR value (each run gets its own temporary directory);
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from etcd_agent.proctree import free_port
from etcd_agent.testing import records as record_files
from etcd_agent.testing.procs import AGENT, TORCHRUN, kill_tree

from .catalog import Line

REPO = Path(__file__).resolve().parents[2]
WORKERS = REPO / "tests" / "workers"
RECORDER = WORKERS / "recorder.py"
PYTHON = sys.executable
LAUNCHERS = {"torchrun": list(TORCHRUN), "etcd-agent": list(AGENT)}
SINGLE_NODE_TIMEOUT = 60.0
MULTI_NODE_TIMEOUT = 120.0

# Variables of the test process that would make runs depend on where the suite runs (set by an outer launcher, a
# CI job, pytest itself); both launchers get the same cleaned environment plus the line's own variables.
_DROP_PREFIXES = ("PET_", "TORCHELASTIC_", "ETCD_AGENT_", "COMPAT_", "PYTEST_")
_DROP_NAMES = {
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "CUDA_VISIBLE_DEVICES", "PYTHON_EXEC", "LOGLEVEL",
    # Set in this very process by importing etcd_agent (for its own gRPC client, never for workers): dropped so that
    # a worker that still has it shows etcd-agent leaking it.
    "GRPC_ENABLE_FORK_SUPPORT",
}
VALUE_EXEMPT = ("MASTER_PORT", "TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_USE_AGENT_STORE", "TMPDIR")
_SPAWN_FDS = re.compile(r"spawn_main\(tracker_fd=\d+, pipe_handle=\d+\)")


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_DROP_PREFIXES) and k not in _DROP_NAMES}


def split_line(cmd: str) -> tuple[dict[str, str], list[str]]:
    """``VAR=v ... torchrun ARGS`` or ``... python -m torch.distributed.run ARGS`` -> (env, ARGS)."""
    words = shlex.split(cmd)
    env = {}
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if words[:1] == ["torchrun"]:
        return env, words[1:]
    if words[:3] == ["python", "-m", "torch.distributed.run"]:
        return env, words[3:]
    raise ValueError(f"not a torchrun line: {cmd}")


def expand(text: str, values: dict[str, str]) -> str:
    """Put the placeholders in (only the known ``{name}`` words: a line may contain other braces, e.g. ${rank})."""
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    return text


def make_wrapper(directory: Path) -> Path:
    """An executable that runs the recorder, for ``--no-python`` lines; one path for every run of a session."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "record-worker"
    path.write_text(f"#!/bin/sh\nexec {shlex.quote(PYTHON)} {shlex.quote(str(RECORDER))} \"$@\"\n")
    path.chmod(0o755)
    return path


@dataclasses.dataclass
class NodeResult:
    argv: list[str]
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float


@dataclasses.dataclass
class Run:
    launcher: str
    line: Line
    nodes: list[NodeResult]
    records: list[dict]  # one per worker process that started
    run_dir: Path
    log_dir: Path
    tmp_dir: Path

    @property
    def status(self) -> str:
        if any(n.timed_out for n in self.nodes):
            return "timeout"
        return "works" if all(n.returncode == 0 for n in self.nodes) else "refused"

    def by_rank(self) -> dict[int, list[dict]]:
        found: dict[int, list[dict]] = {}
        for rec in self.records:
            found.setdefault(int(rec["env"].get("RANK", -1)), []).append(rec)
        return found

    def summary(self) -> str:
        parts = []
        for i, n in enumerate(self.nodes):
            tail = (n.stderr.strip().splitlines() or [""])[-1][:300]
            parts.append(f"node {i}: rc={n.returncode}{' TIMEOUT' if n.timed_out else ''} ({n.seconds:.1f} s) "
                         f"argv={shlex.join(n.argv)}\n  last stderr line: {tail}")
        return "\n".join(parts)


def run(line: Line, launcher: str, run_dir: Path, wrapper: Path, etcd_endpoint: str | None = None,
        add_endpoint: bool = True, nodes: int | None = None, timeout: float | None = None) -> Run:
    """Start the line's launcher processes (all at once) under ``launcher``, wait for them, collect the records."""
    run_dir.mkdir(parents=True, exist_ok=True)
    records_dir, log_dir, tmp_dir = run_dir / "records", run_dir / "logs", run_dir / "tmp"
    for d in (records_dir, log_dir, tmp_dir):
        d.mkdir(exist_ok=True)
    nodes = nodes or line.nodes
    timeout = timeout or (MULTI_NODE_TIMEOUT if line.nodes > 1 or line.multinode else SINGLE_NODE_TIMEOUT)
    shared = {"script": str(RECORDER), "module": RECORDER.stem, "exe": str(wrapper), "head": "127.0.0.1",
              "hostname": socket.gethostname(), "port": str(free_port()), "log_dir": str(log_dir)}
    procs = []
    for i in range(nodes):
        values = dict(shared, node_rank=str(i))
        line_env, args = split_line(expand(line.cmd, values))
        argv = list(LAUNCHERS[launcher])
        if launcher == "etcd-agent" and line.multinode and add_endpoint:
            if etcd_endpoint is None:
                raise ValueError(f"{line.label}: a multi-node line needs an etcd endpoint for etcd-agent")
            argv += ["--etcd-endpoints", etcd_endpoint]
        argv += args
        env = base_env()
        env.update(line_env)
        env.update(COMPAT_RECORD_DIR=str(records_dir), COMPAT_NODE=str(i), TMPDIR=str(tmp_dir))
        out = open(run_dir / f"node{i}.stdout", "w+b")
        err = open(run_dir / f"node{i}.stderr", "w+b")
        proc = subprocess.Popen(argv, cwd=WORKERS, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        procs.append((argv, proc, out, err, time.monotonic()))
    deadline = time.monotonic() + timeout
    results = []
    for argv, proc, out, err, started in procs:
        timed_out = False
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_tree(proc.pid)
            proc.wait()
        seconds = time.monotonic() - started
        for f in (out, err):
            f.flush()
            f.seek(0)
        results.append(NodeResult(argv, proc.returncode, timed_out, out.read().decode(errors="replace"),
                                  err.read().decode(errors="replace"), seconds))
        out.close()
        err.close()
    # Both launchers reap their workers before they exit, and a worker writes its record before its output: every
    # record there is to read is there now (a worker left behind would be a difference of its own).
    return Run(launcher, line, results, record_files.load(records_dir), run_dir, log_dir, tmp_dir)


def run_pair(line: Line, line_dir: Path, wrapper: Path, etcd_endpoint: str | None = None) -> tuple[Run, Run]:
    """The line under torchrun and under etcd-agent, at the same time (each in its own directories, with its own
    free ports; no catalog line leaves the port to a default, so the two cannot collide): about half the wall time
    of running them one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        ref = pool.submit(run, line, "torchrun", line_dir / "torchrun", wrapper)
        got = pool.submit(run, line, "etcd-agent", line_dir / "etcd-agent", wrapper, etcd_endpoint)
        return ref.result(), got.result()


# --- where did each stream go ---------------------------------------------------------------------------------------

def _log_files(run_: Run) -> list[tuple[Path, str]]:
    found = []
    for root in (run_.log_dir, run_.tmp_dir):
        for path in root.rglob("*"):
            if path.is_file() and path.stat().st_size < 4_000_000:
                try:
                    found.append((path, path.read_text(errors="replace")))
                except OSError:
                    pass
    return found


def stream_places(run_: Run) -> dict[tuple[int, str], dict]:
    """(rank, "stdout"|"stderr") -> {"where": category text, "files": [paths]} for each worker's marker line."""
    files = _log_files(run_)
    places = {}
    for rec in run_.records:
        rank, pid = rec["env"].get("RANK", "?"), rec["pid"]
        node = run_.nodes[int(rec.get("node", 0))]
        for stream, word in (("stdout", "OUT"), ("stderr", "ERR")):
            marker = f"COMPAT-{word} rank={rank} pid={pid}"
            console = set()
            for console_name, text in (("stdout", node.stdout), ("stderr", node.stderr)):
                for text_line in text.splitlines():
                    at = text_line.find(marker)
                    if at < 0 or text_line[at + len(marker):].strip():
                        continue
                    prefix = text_line[:at]
                    console.add(f"console {console_name} " + (f"prefixed {prefix!r}" if prefix else "plain"))
            in_files = sorted(str(p) for p, text in files if marker in text.splitlines())
            if console:
                where = " + ".join(sorted(console))
            else:
                where = "file only" if in_files else "nowhere"
            places[(int(rank) if rank.lstrip("-").isdigit() else -1, stream)] = {"where": where, "files": in_files}
    return places


# --- comparison -----------------------------------------------------------------------------------------------------

def _is_generated_uuid(value: str, line: Line) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return value not in line.cmd


def _norm_argv(argv: list[str]) -> list[str]:
    return [_SPAWN_FDS.sub("spawn_main(tracker_fd=N, pipe_handle=N)", a) for a in argv]


def env_differences(line: Line, ref: dict[str, str], got: dict[str, str]) -> list[str]:
    diffs = []
    for name in sorted(set(ref) | set(got)):
        if name.startswith("COMPAT_"):
            continue
        if name not in got:
            diffs.append(f"env {name} missing (torchrun: {ref[name]!r})")
        elif name not in ref:
            if not name.startswith("ETCD_AGENT_"):
                diffs.append(f"env {name}={got[name]!r} set, torchrun does not set it")
        elif ref[name] != got[name]:
            if name in VALUE_EXEMPT:
                continue
            if name == "TORCHELASTIC_RUN_ID" and _is_generated_uuid(ref[name], line):
                continue
            if name == "TORCHELASTIC_RUN_ID" and ref[name] == "none" and got[name].startswith("static-"):
                continue  # a multi-node static line without --rdzv-id: etcd-agent derives the job's id (README)
            diffs.append(f"env {name}={got[name]!r}, torchrun: {ref[name]!r}")
    return diffs


def compare(line: Line, ref: Run, got: Run) -> list[str]:
    """Every difference of ``got`` (etcd-agent) from ``ref`` (torchrun), each one line; [] when they match."""
    diffs: list[str] = []
    if ref.status != got.status:
        diffs.append(f"exit: torchrun {ref.status} (rc {[n.returncode for n in ref.nodes]}), etcd-agent "
                     f"{got.status} (rc {[n.returncode for n in got.nodes]}); etcd-agent said: "
                     f"{_last_line(got)!r}")
    if ref.status == "refused" and got.status == "refused":
        for i, n in enumerate(got.nodes):
            if "Traceback (most recent call last)" in n.stderr:
                diffs.append(f"node {i}: the refusal is a traceback, not a clear error: {_last_line(got)!r}")
            elif not n.stderr.strip():
                diffs.append(f"node {i}: refused without a word on stderr")
    ref_ranks, got_ranks = ref.by_rank(), got.by_rank()
    if len(ref.records) != len(got.records) or set(ref_ranks) != set(got_ranks):
        diffs.append(f"workers: torchrun started {len(ref.records)} (ranks {sorted(ref_ranks)}), etcd-agent "
                     f"{len(got.records)} (ranks {sorted(got_ranks)})")
    ref_nodes = sorted(sorted(int(r["env"]["RANK"]) for r in ref.records if r["node"] == str(i))
                       for i in range(len(ref.nodes)))
    got_nodes = sorted(sorted(int(r["env"]["RANK"]) for r in got.records if r["node"] == str(i))
                       for i in range(len(got.nodes)))
    if "{node_rank}" in line.cmd:  # static rendezvous: node i must get node i's ranks
        ref_nodes = [sorted(int(r["env"]["RANK"]) for r in ref.records if r["node"] == str(i))
                     for i in range(len(ref.nodes))]
        got_nodes = [sorted(int(r["env"]["RANK"]) for r in got.records if r["node"] == str(i))
                     for i in range(len(got.nodes))]
    if ref_nodes != got_nodes and len(ref.records) == len(got.records):
        diffs.append(f"ranks per node: torchrun {ref_nodes}, etcd-agent {got_nodes}")
    ref_places, got_places = stream_places(ref), stream_places(got)
    for rank in sorted(set(ref_ranks) & set(got_ranks)):
        r, g = ref_ranks[rank][0], got_ranks[rank][0]
        if r["orig_argv"][:1] != g["orig_argv"][:1]:
            diffs.append(f"rank {rank}: interpreter {g['orig_argv'][:1]}, torchrun {r['orig_argv'][:1]}")
        run_path = "--run-path" in line.cmd  # torchrun runs the script through runpy in a spawned child (README)
        if not run_path and _norm_argv(r["orig_argv"][1:]) != _norm_argv(g["orig_argv"][1:]):
            diffs.append(f"rank {rank}: command line {g['orig_argv'][1:]}, torchrun {r['orig_argv'][1:]}")
        if r["argv"] != g["argv"]:
            diffs.append(f"rank {rank}: sys.argv {g['argv']}, torchrun {r['argv']}")
        if r["cwd"] != g["cwd"]:
            diffs.append(f"rank {rank}: cwd {g['cwd']}, torchrun {r['cwd']}")
        diffs += [f"rank {rank}: {d}" for d in env_differences(line, r["env"], g["env"])]
        for stream in ("stdout", "stderr"):
            rp, gp = ref_places.get((rank, stream)), got_places.get((rank, stream))
            if rp is None or gp is None:
                continue
            if (stream == "stderr" and "--local-ranks-filter" in line.cmd and rp["where"] == "nowhere"
                    and gp["where"] == "file only"):
                continue  # a hidden rank's stderr: etcd-agent keeps it in stderr.log for failure reports (README)
            if rp["where"] != gp["where"]:
                diffs.append(f"rank {rank} {stream}: {gp['where']}, torchrun: {rp['where']}")
            elif rp["files"] and not gp["files"]:
                diffs.append(f"rank {rank} {stream}: no log file, torchrun writes {rp['files'][0]}")
            elif any(f.startswith(str(ref.log_dir)) for f in rp["files"]) and \
                    not any(f.startswith(str(got.log_dir)) for f in gp["files"]):
                diffs.append(f"rank {rank} {stream}: log file not under --log-dir ({gp['files']})")
    return diffs


def _last_line(run_: Run) -> str:
    for n in run_.nodes:
        lines = [x for x in n.stderr.strip().splitlines() if x.strip()]
        if n.returncode != 0 and lines:
            return lines[-1][:300]
    return ""


# --- the table ------------------------------------------------------------------------------------------------------

def row(line: Line, ref: Run, got: Run | None, diffs: list[str], error: str = "") -> dict:
    if got is None:
        agent = f"error: {error}"
    elif diffs:
        agent = "differs: " + "; ".join(_dedupe(diffs))
    else:
        agent = got.status
    return {"label": line.label, "source": line.source, "line": line.cmd, "note": line.note,
            "torchrun": ref.status, "etcd_agent": agent, "differences": diffs,
            "seconds": {"torchrun": max(n.seconds for n in ref.nodes),
                        "etcd_agent": max(n.seconds for n in got.nodes) if got else None}}


def _dedupe(diffs: list[str]) -> list[str]:
    """Fold 'rank N: X' repeated for every rank into one 'ranks 0,1: X' entry."""
    groups: dict[str, list[str]] = {}
    order = []
    for d in diffs:
        m = re.match(r"^rank (\d+)( \w+)?: (.*)$", d)
        key = f"{m.group(2) or ''}: {m.group(3)}" if m else d
        if key not in groups:
            groups[key] = []
            order.append(key)
        if m:
            groups[key].append(m.group(1))
    out = []
    for key in order:
        ranks = groups[key]
        out.append(f"rank{'s' if len(ranks) > 1 else ''} {','.join(ranks)}{key}" if ranks else key)
    return out


def markdown(rows: list[dict]) -> str:
    out = ["| line | source | torchrun | etcd-agent |", "|---|---|---|---|"]
    for r in rows:
        agent = r["etcd_agent"].replace("|", "\\|")
        out.append(f"| `{r['label']}` | {r['source']} | {r['torchrun']} | {agent} |")
    return "\n".join(out)
