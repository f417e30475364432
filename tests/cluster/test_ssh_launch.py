"""deploy/ssh-launch.sh, run unchanged from the root namespace against a real sshd on each of node1..node3.

Each node runs OpenSSH's sshd in its own namespaces (so `hostname` there is the node's), listening only on the
node's bed address, with host keys and a root key pair made for the test (`PermitRootLogin prohibit-password`, no
PAM, no password). The launcher gets `SSH="ssh -F /dev/null -i KEY -o UserKnownHostsFile=... -o
StrictHostKeyChecking=yes ..."`, the bed's etcd, NPROC_PER_NODE=2, ETCD_AGENT_BIN (the project's etcd-agent) and a
REMOTE_DIR with a space in its name.

What must hold:
- a job: the launcher exits 0, etcd says succeeded, ranks 0..5 ran two on each host under its own name, every
  worker got its arguments exactly (one with spaces, quotes, `$` and a backslash) and ran in REMOTE_DIR;
- Ctrl-C (SIGINT to the launcher's process group) mid-job: the launcher ends ssh, each remote agent gets SIGHUP
  from its hung-up terminal, stops its workers and leaves; no agent or worker is left on any node, and etcd says
  the job ended (the last agent ended it `stopped`: `every node of the job left; the last, NODE, received SIGHUP`).

Costs: the sshds start in about a second; each test takes about 2 s.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etcd_agent.testing import records as record_files

from . import history
from .bed import NODES, address, etcd_endpoints, on_host
from .slurm import NPROC, ROOT, WORKER, records, status

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

LAUNCHER = ROOT / "deploy" / "ssh-launch.sh"
SSHD = "/usr/sbin/sshd"  # sshd re-executes itself: it must be started by its absolute path
WORLD = NPROC * len(NODES)
ODD_ARG = """a b  'single' "double" $HOME \\back"""  # reaches the worker as one argument, unchanged
STOP_S = 60.0  # a hang guard on Ctrl-C to no process left: ssh's end, SIGHUP, the workers' stop


class Sshds:
    """One sshd per node, in the node's namespaces, on the node's bed address; a key pair for root."""

    def __init__(self, where: Path):
        self.where, self.procs = where, {}
        self.key = where / "id_ed25519"
        self.known_hosts = where / "known_hosts"
        keygen(self.key)
        (where / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        lines = []
        for node in NODES:
            host_key = where / f"host_key_{node}"
            keygen(host_key)
            lines.append(f"{node} {host_key.with_suffix('.pub').read_text().strip()}")
            conf = where / f"sshd_config_{node}"
            conf.write_text(SSHD_CONFIG.format(addr=address(node), host_key=host_key, where=where, node=node))
        self.known_hosts.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        for node in NODES:
            with open(self.where / f"sshd-{node}.log", "ab") as log:
                self.procs[node] = subprocess.Popen(
                    on_host(node, [SSHD, "-D", "-e", "-f", str(self.where / f"sshd_config_{node}")]),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for node in NODES:  # listening: an ssh that runs `hostname` there answers with the node's name
            deadline = time.monotonic() + 60
            while (done := subprocess.run([*self.ssh(), node, "hostname"], capture_output=True, text=True,
                                          stdin=subprocess.DEVNULL, timeout=60)).stdout.strip() != node:
                assert self.procs[node].poll() is None and time.monotonic() < deadline, (
                    f"sshd on {node}: {done.stderr.strip()} {(self.where / f'sshd-{node}.log').read_text()}")
                time.sleep(0.1)  # a listening socket has no event to wait on from outside the namespace

    def ssh(self) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-i", str(self.key), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "LogLevel=ERROR", "-l", "root"]

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.wait(10)


SSHD_CONFIG = """\
ListenAddress {addr}
HostKey {host_key}
PidFile {where}/sshd-{node}.pid
AuthorizedKeysFile {where}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
PrintLastLog no
"""


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def sshds(cluster, tmp_path_factory):
    if shutil.which("ssh") is None or not os.path.exists(SSHD):
        pytest.skip("needs OpenSSH's ssh and sshd: tools/setup.sh installs them (openssh-client, openssh-server)")
    servers = Sshds(tmp_path_factory.mktemp("ssh"))
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


def launch(sshds: Sshds, tmp_path: Path, run_id: str, *worker_args: str) -> tuple[subprocess.Popen, Path, Path]:
    """deploy/ssh-launch.sh "node1 node2 node3" RUN_ID --log-dir LOGS worker.py OUT ODD_ARG WORKER_ARGS, in a
    session of its own (its process group is the terminal's foreground group); returns it, OUT and REMOTE_DIR."""
    out, remote_dir = tmp_path / "out", tmp_path / "remote dir"
    out.mkdir()
    remote_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ETCD_AGENT_"))}
    env.update(SSH=" ".join(sshds.ssh()), ETCD_AGENT_ENDPOINTS=etcd_endpoints(), NPROC_PER_NODE=str(NPROC),
               ETCD_AGENT_BIN=str(Path(sys.executable).parent / "etcd-agent"), REMOTE_DIR=str(remote_dir))
    with open(tmp_path / "launcher.out", "wb") as log:
        proc = subprocess.Popen([str(LAUNCHER), " ".join(NODES), run_id, "--log-dir", str(tmp_path / "logs"),
                                 str(WORKER), str(out), ODD_ARG, *worker_args],
                                cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, out, remote_dir


def wait_nothing_left(sshds: Sshds, timeout: float) -> None:
    keep = {p.pid for p in sshds.procs.values()}
    deadline = time.monotonic() + timeout
    while leftovers := {h: cmds for h in NODES if (cmds := history.left_on(h, keep))}:
        assert time.monotonic() < deadline, f"left running: {leftovers}"
        time.sleep(0.05)  # process exits in another namespace have no event to wait on


def test_ssh_launch_runs_one_agent_per_host(cluster, sshds, tmp_path):
    run_id = "ssh-job"
    proc, out, remote_dir = launch(sshds, tmp_path, run_id)
    try:
        code = proc.wait(90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
    output = (tmp_path / "launcher.out").read_text(errors="replace")
    assert code == 0, output
    assert all(f"[{n}] " in output for n in NODES), output  # each host's lines, prefixed with its name
    state = status(cluster, run_id)
    assert state["result"]["outcome"] == "succeeded", state
    found = records(out)
    assert sorted(found) == [(1, r) for r in range(WORLD)], sorted(found)
    plan = [m["node"] for m in state["plan"]["members"]]
    for (_, rank), rec in found.items():
        assert rec["argv"] == [str(out), ODD_ARG], rec["argv"]
        assert rec["cwd"] == str(remote_dir), rec["cwd"]
        assert rec["host"] == plan[rank // NPROC], (plan, rec)  # group rank g runs on the g-th member's host
        assert rec["env"]["TORCHELASTIC_RUN_ID"] == run_id and rec["env"]["WORLD_SIZE"] == str(WORLD), rec
    assert sorted(rec["host"] for rec in found.values()) == sorted(NODES * NPROC)
    wait_nothing_left(sshds, STOP_S)


def test_ctrl_c_stops_every_remote_agent(cluster, sshds, tmp_path):
    run_id, stop = "ssh-ctrl-c", tmp_path / "stop"
    proc, out, _ = launch(sshds, tmp_path, run_id, "--until", str(stop))
    try:
        def started() -> bool:
            assert proc.poll() is None, (tmp_path / "launcher.out").read_text(errors="replace")
            return len(records(out)) >= WORLD
        record_files.wait_until(started, 60, "every worker to start", out, pids=[proc.pid])
        interrupted = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal's foreground process group
        code = proc.wait(STOP_S)
        wait_nothing_left(sshds, STOP_S)
        gone = time.monotonic() - interrupted
    finally:
        stop.touch()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = (tmp_path / "launcher.out").read_text(errors="replace")
    assert code != 0, output
    state = status(cluster, run_id)
    result = state["result"]
    assert result is not None and result["outcome"] == "stopped", (state, output)
    assert result["reason"].startswith("every node of the job left; the last, node") and \
        result["reason"].endswith("received SIGHUP"), (result, output)
    assert not state["nodes"], state["nodes"]
    left = [e for e in history.events(cluster, run_id) if e["event"] == "node gone"]
    assert len(left) == len(NODES), left
    print(f"Ctrl-C: launcher exited {code}, nothing left on any node {gone:.1f} s after; etcd: {result['reason']!r}")
