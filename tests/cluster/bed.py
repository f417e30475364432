"""A multi-host Slurm cluster on this one machine, built for the cluster tests and removed after them.

What it is (every address from 198.18.0.0/15, and only inside what the bed itself creates):

    bridge eabed0 in the root namespace      198.18.0.1/24
    slurmctl      slurmctld                  198.18.0.2
    node1..node3  slurmd -N nodeK            198.18.0.11-13
    etcd1..etcd3  one etcd member each       198.18.0.21-23 (client port 2379, peer port 2380)

Each host is a network namespace joined to the bridge by a veth pair, and everything started on it runs in a UTS
namespace of its own with the host's name (`nsenter --net=... unshare --uts sh -c 'hostname NAME; exec CMD'`:
nsenter rather than `ip netns exec`, which remounts /sys and so hides the cgroup hierarchies slurmd reads). Names
resolve through /etc/hosts lines that end with record.MARK. One munged in the root namespace serves every host through a
socket in the bed's temporary directory (the filesystem is shared: one install of the project serves all nodes),
with a key of its own; Slurm finds it through `AuthInfo=socket=`. slurm.conf and cgroup.conf are written to the
temporary directory; clients find them through SLURM_CONF (``Bed.env``). No GRES: a job asks
`--gpus-per-node=0`.

Guarantees: ``Bed.teardown`` removes everything ``Bed.build`` made (processes of the bed's namespaces, slurmd's
jobs included; the namespaces, veths and bridge; the /etc/hosts lines; the temporary directory), whatever failed,
and raises at the end naming what it could not remove. What it made is recorded on disk as it goes (record.py):
a bed whose test session was killed is removed by the next build, or by `python tests/cluster/record.py clean`;
a second bed on this machine waits for the first to go.

Imports the project only for its embedded etcd (``etcd_agent.etcd.server``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from etcd_agent.etcd import server as standalone
from .record import BedError, Record, clean_stale, edit_hosts, kill_namespace, remove, run

log = logging.getLogger("cluster-bed")

SUBNET = "198.18.0"
BRIDGE = "eabed0"
CTL = "slurmctl"
NODES = ("node1", "node2", "node3")
ETCDS = ("etcd1", "etcd2", "etcd3")
HOST_NUMBERS = {CTL: 2, **{n: 11 + i for i, n in enumerate(NODES)}, **{e: 21 + i for i, e in enumerate(ETCDS)}}
ETCD_CLIENT_PORT, ETCD_PEER_PORT = 2379, 2380
URGENT = "urgent"  # a partition whose jobs preempt (requeue) the default partition's jobs
CRED_EXPIRE_S = 10  # Slurm's step credential lifetime, and how long a requeued job waits to start again (120 s)
READY_S = 30.0
POLL_S = 0.05  # slurmctld's node states have no event to wait on: they are polled
NEEDED = ("ip", "nsenter", "unshare", "etcd", "munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")
INSTALL_HINT = "tools/setup.sh installs them (apt-get install slurm-wlm munge etcd-server nftables)"


def address(host: str) -> str:
    return f"{SUBNET}.{HOST_NUMBERS[host]}"


def etcd_endpoints() -> str:
    return ",".join(f"{address(e)}:{ETCD_CLIENT_PORT}" for e in ETCDS)


def on_host(host: str, argv: list[str]) -> list[str]:
    """``argv`` run on ``host``: in its network namespace, in a UTS namespace of its own named ``host``."""
    return ["nsenter", f"--net=/run/netns/{host}", "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
            host, *argv]


def unusable() -> str | None:
    """Why this machine cannot hold the bed, or None: the tests skip with this reason."""
    if os.geteuid() != 0:
        return "the cluster bed needs root (network namespaces, daemons, /etc/hosts lines)"
    missing = [b for b in NEEDED if shutil.which(b) is None]
    if missing:
        return f"the cluster bed needs {', '.join(missing)}, not found on PATH: {INSTALL_HINT}"
    probe = f"eabed-probe-{os.getpid()}"
    try:
        run("ip", "netns", "add", probe)
        try:
            run(*on_host(probe, ["hostname"]))
        finally:
            run("ip", "netns", "delete", probe, check=False)
    except (BedError, OSError, subprocess.TimeoutExpired) as exc:
        return f"network or UTS namespaces are not usable here: {exc}"
    return None


# --- the bed --------------------------------------------------------------------------------------------------

class NamespacedEtcd(standalone.EtcdServer):
    """An etcd member started on host ``name`` (its namespaces) instead of this one."""

    def command(self, binary: str) -> list[str]:
        return on_host(self.name, super().command(binary))


class Bed:
    """The cluster. ``build()`` makes it and waits until every node is idle in Slurm and every etcd member is
    healthy; ``teardown()`` removes it. ``build_seconds`` says what the build took."""

    def __init__(self) -> None:
        self.record = Record()
        self.root: Path | None = None
        self.procs: list[subprocess.Popen] = []  # everything this bed started, for reaping
        self.slurmd: dict[str, subprocess.Popen] = {}
        self.etcd: list[NamespacedEtcd] = []
        self.build_seconds: float | None = None
        self.crashed: set[int] = set()  # pids of the daemons crash() killed

    # paths in the bed's directory
    conf = property(lambda self: self.root / "slurm.conf")
    munge_socket = property(lambda self: self.root / "munge" / "munge.socket")
    logs = property(lambda self: self.root / "log")

    def build(self) -> Bed:
        start = time.monotonic()
        self.record.lock()
        clean_stale()
        self.root = Path(tempfile.mkdtemp(prefix="etcd-agent-bed-"))
        self.root.chmod(0o711)  # munged wants its socket's directories searchable by all
        self.record.add("root", str(self.root))
        for sub in ("log", "run", "munge", "slurmctld", "etcd", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True)
        self._network()
        edit_hosts([f"{address(h)} {h}" for h in HOST_NUMBERS])
        self.record.add("hosts", True)
        self._etcd()
        self._munge()
        self._slurm()
        self.wait_ready()
        self.build_seconds = time.monotonic() - start
        log.info("cluster bed built in %.1f s under %s", self.build_seconds, self.root)
        return self

    def _network(self) -> None:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        self.record.add("links", BRIDGE)
        run("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        for host in HOST_NUMBERS:
            run("ip", "netns", "add", host)
            self.record.add("netns", host)
            veth = f"eabed-{host}"  # the root namespace's end; the namespace's end is eth0
            run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host)
            run("ip", "link", "set", veth, "master", BRIDGE, "up")
            run("ip", "-n", host, "addr", "add", f"{address(host)}/24", "dev", "eth0")
            run("ip", "-n", host, "link", "set", "eth0", "up")
            run("ip", "-n", host, "link", "set", "lo", "up")

    def _etcd(self) -> None:
        cluster = ",".join(f"{e}=http://{address(e)}:{ETCD_PEER_PORT}" for e in ETCDS)
        for name in ETCDS:
            member = NamespacedEtcd(name=name, data_dir=str(self.root / "etcd" / name), host=address(name),
                                    client_port=ETCD_CLIENT_PORT, peer_port=ETCD_PEER_PORT, initial_cluster=cluster,
                                    cluster_token="etcd-agent-bed", log_file=str(self.logs / f"{name}.log"))
            self.etcd.append(member)
            member.spawn()  # a new cluster's members need each other to become ready

    def _munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "wb") as f:
            f.write(os.urandom(1024))
        d = self.root / "munge"
        self.spawn_root("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                                   f"--socket={self.munge_socket}", f"--pid-file={d / 'munged.pid'}",
                                   f"--seed-file={d / 'munged.seed'}", f"--log-file={self.logs / 'munged.log'}"])
        poll(lambda: self.munge_socket.exists(), READY_S, "munged made its socket", self.daemons())

    def _slurm(self) -> None:
        self.conf.write_text(slurm_conf(self.root, self.munge_socket))
        (self.root / "cgroup.conf").write_text(CGROUP_CONF)
        self.spawn_on(CTL, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in NODES:
            self.start_slurmd(node)

    def start_slurmd(self, node: str) -> None:
        self.slurmd[node] = self.spawn_on(node, f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])

    def spawn_on(self, host: str, name: str, argv: list[str]) -> subprocess.Popen:
        return self._spawn(name, on_host(host, argv))

    def spawn_root(self, name: str, argv: list[str]) -> subprocess.Popen:
        proc = self._spawn(name, argv)
        self.record.add("pids", [proc.pid, psutil.Process(proc.pid).create_time()])
        return proc

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.out", "ab") as out:
            # A session of its own: Ctrl-C reaches the test run only, and teardown stops the daemons in order.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env(), start_new_session=True)
        self.procs.append(proc)
        return proc

    def wait_ready(self, timeout: float = READY_S) -> None:
        for member in self.etcd:
            member.wait_ready(timeout)
        self.wait_nodes("IDLE", NODES, timeout)

    def node_states(self) -> dict[str, str]:
        """node -> its Slurm state (IDLE, ALLOCATED, DOWN*, ...); empty while slurmctld does not answer."""
        done = subprocess.run(["scontrol", "-o", "show", "nodes"], env=self.env(), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)
        if done.returncode != 0:
            return {}
        states = {}
        for line in done.stdout.splitlines():
            fields = scontrol_fields(line)
            states[fields.get("NodeName", "")] = fields.get("State", "")
        return states

    def wait_nodes(self, state: str, nodes=NODES, timeout: float = READY_S) -> None:
        """Wait until every one of ``nodes`` is in Slurm state ``state`` (its flags aside)."""
        def ready():
            states = self.node_states()
            return all(states.get(n, "").split("+")[0].rstrip("*~#!%$@^-") == state for n in nodes)
        poll(ready, timeout, lambda: f"{', '.join(nodes)} {state} in Slurm (now {self.node_states()})", self.daemons())

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for Slurm's clients (and anything submitted): SLURM_CONF set, the caller's other
        SLURM_* variables dropped (a test session that itself runs under Slurm), the venv's bin first on PATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        if self.root is not None:
            env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def crash(self, host: str) -> None:
        """The host dies: SIGKILL to every process in its network namespace, its slurmd included."""
        kill_namespace(host, self.procs)
        self.crashed.update(p.pid for p in self.procs if p.args[1] == f"--net=/run/netns/{host}")

    def daemons(self) -> list[subprocess.Popen]:
        """The daemons that should be running: every one started, but those of crashed hosts."""
        return [p for p in self.procs if p.pid not in self.crashed]

    def teardown(self) -> None:
        """Remove what build made. A bed that never got the lock made nothing (the record there is another's);
        one whose removal failed leaves its record for the next build, or `record.py clean`, to try again."""
        if not self.record.locked:
            return
        try:
            if self.record.made_anything:
                for member in self.etcd:
                    member.stop(timeout=5.0)
                failures = remove(self.record.items, self.procs)
                if failures:
                    raise BedError("the cluster bed was not removed entirely: " + "; ".join(failures))
                self.record.forget()
        finally:
            self.record.unlock()


def poll(check, timeout: float, what, procs=()):
    """Call ``check`` until it is truthy; fail naming ``what`` (a string, or a function that says it then) after
    ``timeout``, or at once when one of the daemons ``procs`` died."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        dead = [p.args for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise BedError(f"waiting for {said}: " + (f"exited: {dead}" if dead else f"not within {timeout:g} s"))
        time.sleep(POLL_S)
    return value


def scontrol_fields(line: str) -> dict[str, str]:
    """``Key=Value Key=Value`` (scontrol -o) -> dict; a value runs to the next `` Key=``."""
    return dict(re.findall(r"(\S+?)=(.*?)(?= \S+?=|$)", line.strip()))


CGROUP_CONF = """\
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
CgroupAutomount=no
"""


def slurm_conf(root: Path, munge_socket: Path) -> str:
    cpus = os.cpu_count() or 1
    nodes = "\n".join(f"NodeName={n} NodeAddr={address(n)} NodeHostname={n} CPUs={cpus} State=UNKNOWN"
                      for n in NODES)
    return f"""\
ClusterName=etcdagentbed
SlurmctldHost={CTL}({address(CTL)})
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/slurmctld
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdSpoolDir={root}/spool/%n
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
SlurmdTimeout=10
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
{nodes}
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=bed Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName={URGENT} Nodes={','.join(NODES)} MaxTime=INFINITE State=UP PriorityTier=2
"""
