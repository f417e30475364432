"""Private etcd processes: one implementation for ``--standalone``, the etcd a c10d line's endpoint names (see
``job_etcd``), test fixtures, benchmarks.

- ``EtcdServer.start()`` returns once the process it spawned (not another one on the port) logged that it serves
  clients and answers ``/health``; if it exits first (port taken, bad flag), ``EtcdUnavailable`` carries its log tail.
- A stopped server leaves no etcd behind: etcd runs in its own process group and starts no children; stop is SIGTERM,
  a grace period, SIGKILL; an ``atexit`` hook stops what still runs; an etcd started from the main thread also gets
  SIGKILL when this process dies (PR_SET_PDEATHSIG).
- etcd's own defaults are kept, but for its history and space (``SPACE_ARGS``: compaction and an explicit quota, so
  that a long job on an etcd nobody maintains never meets the NOSPACE alarm); other tunings (fast elections,
  progress notify) come only through ``extra_args``, which also override ``SPACE_ARGS`` flag by flag.

A server owns one directory: etcd's data in ``<data_dir>/etcd``, its output in ``<data_dir>/etcd.log`` (or
``log_file``). Servers are not thread-safe. Imports only the standard library, psutil (through ``proctree``),
``errors`` and ``proctree``. Clusters of servers for tests are ``testing.cluster``.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid

from .. import errors
from ..proctree import free_port, kill_group, pdeathsig_preexec

log = logging.getLogger(__name__)

BINARY_ENV = "ETCD_AGENT_ETCD_BIN"
INSTALL_HINT = "apt-get install etcd-server"
# Elections in a fraction of a second instead of etcd's one to two seconds: for tests and benchmarks, never a default.
FAST_ELECTION_ARGS = ("--heartbeat-interval=50", "--election-timeout=500")
# What etcd logs once it serves clients: capnslog (3.4's default) and zap (3.5+) say the first, 3.4's zap the second.
_READY_MARKERS = ("ready to serve client requests", "serving client traffic")
# etcd keeps every revision until it is compacted and refuses all writes once its database reaches the quota (the
# NOSPACE alarm, which only an operator clears). So every etcd started here compacts by itself, every 5 minutes down
# to the last 100,000 revisions (`events` then still shows thousands of rounds of a job's history), under an explicit
# quota of 4 GiB: twice etcd's default, and far above what that much history takes (a few hundred bytes a revision).
SPACE_ARGS = ("--auto-compaction-mode=revision", "--auto-compaction-retention=100000",
              "--quota-backend-bytes=4294967296")
_HEALTH_POLL_S = 0.05  # /health and leader queries have no event to wait on; they are polled with a deadline
WILDCARD = "0.0.0.0"
_TAIL_LINES = 40

_lock = threading.Lock()
_live: set[EtcdServer] = set()
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy


def find_etcd_binary() -> str:
    """The etcd binary: ``$ETCD_AGENT_ETCD_BIN`` if set, else ``etcd`` on PATH."""
    configured = os.environ.get(BINARY_ENV)
    found = shutil.which(configured or "etcd")
    if found:
        return found
    if configured:
        raise errors.ConfigError(f"${BINARY_ENV} is {configured!r}, which is not an executable file; point it at an "
                                 f"etcd binary, or unset it to use `etcd` on PATH (install: `{INSTALL_HINT}`)")
    raise errors.ConfigError(f"no etcd binary: ${BINARY_ENV} is not set and there is no `etcd` on PATH; "
                             f"install one with `{INSTALL_HINT}` or set ${BINARY_ENV}")


def url(host: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def reachable(host: str) -> str:
    """Where this machine reaches a server listening on ``host`` (a wildcard listener: on loopback)."""
    return {WILDCARD: "127.0.0.1", "::": "::1"}.get(host, host)


def _get_json(address: str, body: bytes | None, timeout: float) -> dict:
    try:
        with _http.open(urllib.request.Request(address, data=body), timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return {}


def health(client_url: str, timeout: float = 1.0) -> bool:
    """True when the etcd at ``client_url`` answers ``/health`` with ``{"health": "true"}``."""
    return _get_json(f"{client_url}/health", None, timeout).get("health") == "true"


def is_leader(client_url: str, timeout: float = 1.0) -> bool:
    """True when the member at ``client_url`` reports itself the leader (maintenance status, JSON gateway)."""
    st = _get_json(f"{client_url}/v3/maintenance/status", b"{}", timeout)
    return bool(st.get("leader")) and st["leader"] == st.get("header", {}).get("member_id")


def _child_env() -> dict[str, str]:
    # etcd reads ETCD_* variables as flags and refuses those that shadow a flag we pass.
    return {k: v for k, v in os.environ.items() if not k.startswith("ETCD_") or k == "ETCD_UNSUPPORTED_ARCH"}


def _pump(stream, sink, tail, ready, settled) -> None:
    """Copy etcd's output to its log file, keep its tail, and signal the ready line or the end of the output."""
    with stream, sink:
        for line in stream:
            sink.write(line)
            sink.flush()
            tail.append(line.decode(errors="replace").rstrip())
            if not ready.is_set() and any(marker in tail[-1] for marker in _READY_MARKERS):
                ready.set()
                settled.set()
    settled.set()


def _unless_given(defaults: tuple[str, ...], given: tuple[str, ...]) -> tuple[str, ...]:
    """The ``--flag=value`` defaults whose flag ``given`` does not set."""
    names = {arg.split("=", 1)[0] for arg in given}
    return tuple(arg for arg in defaults if arg.split("=", 1)[0] not in names)


class EtcdServer:
    """One etcd member, started and stopped by this process: on loopback ports unless told otherwise. ``host`` is
    the address it listens on (a wildcard listens on every interface, its peer port then on loopback);
    ``advertise_host`` the name it gives clients (default: where this machine reaches ``host``)."""

    def __init__(self, name="etcd-agent", data_dir=None, host="127.0.0.1", client_port=None, peer_port=None,
                 initial_cluster=None, cluster_state="new", extra_args=(), binary=None, log_file=None,
                 cluster_token=None, advertise_host=None):
        self.name = name
        self.host = host
        self.advertise_host = advertise_host or reachable(host)
        self._pick_ports = client_port is None and peer_port is None and initial_cluster is None
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(reachable(host))
        self.initial_cluster = initial_cluster  # None: this member alone
        self.cluster_state = cluster_state
        self.cluster_token = cluster_token or f"{name}-{uuid.uuid4().hex[:12]}"
        self.extra_args = tuple(extra_args)
        self.binary, self.log_file = binary, log_file
        self._data_dir, self._own_data_dir = data_dir, data_dir is None
        self._proc: subprocess.Popen | None = None
        self._was_ready = self._frozen = False
        # Set by each spawn(): output reader thread, log tail, "ready line seen", "ready line seen or output ended".
        self._reader = self._tail = self._ready = self._settled = None

    endpoint = property(lambda self: url(reachable(self.host), self.client_port).removeprefix("http://"))
    scheme = "http"  # a TLS member (tests' TlsEtcd) says https: every client URL it listens on uses it
    client_url = property(lambda self: url(reachable(self.host), self.client_port, self.scheme))
    peer_url = property(lambda self: url(reachable(self.host), self.peer_port))
    health_url = property(lambda self: self.client_url)  # where /health answers (a TLS member's metrics URL)
    data_dir = property(lambda self: self._data_dir)
    log_path = property(lambda self: self.log_file or os.path.join(self._data_dir, "etcd.log"))
    running = property(lambda self: self._proc is not None and self._proc.returncode is None)
    frozen = property(lambda self: self._frozen)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running else None

    def command(self, binary: str) -> list[str]:
        return [
            binary, f"--name={self.name}", f"--data-dir={os.path.join(self._data_dir, 'etcd')}",
            f"--listen-client-urls={url(self.host, self.client_port, self.scheme)}",
            f"--advertise-client-urls={url(self.advertise_host, self.client_port, self.scheme)}",
            f"--listen-peer-urls={self.peer_url}", f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster or f'{self.name}={self.peer_url}'}",
            f"--initial-cluster-state={self.cluster_state}", f"--initial-cluster-token={self.cluster_token}",
            *self.extra_args, *_unless_given(SPACE_ARGS, self.extra_args),
        ]

    def start(self, timeout: float = 30.0) -> EtcdServer:
        """Spawn etcd and wait until this process serves clients; retry on fresh ports if chosen ones got taken."""
        attempts = 3 if self._pick_ports and not self._was_ready else 1
        for attempt in range(1, attempts + 1):
            self.spawn()
            try:
                return self.wait_ready(timeout)
            except errors.EtcdUnavailable as exc:
                if attempt == attempts or "address already in use" not in str(exc):
                    raise
                log.info("etcd %s lost its chosen ports to another process; trying fresh ones", self.name)
                self.client_port, self.peer_port = free_port(self.host), free_port(reachable(self.host))
        return self

    def spawn(self) -> None:
        """Start the etcd process without waiting (members of a new cluster need each other to become ready)."""
        if self.running:
            return
        binary = self.binary or find_etcd_binary()
        if self._data_dir is None:
            self._data_dir = tempfile.mkdtemp(prefix=f"{self.name}-")
        os.makedirs(self._data_dir, exist_ok=True)
        # The kernel sends a death signal when the spawning *thread* ends, so only the main thread asks for it.
        main = threading.current_thread() is threading.main_thread()
        hook = pdeathsig_preexec(os.getpid()) if main else None
        try:
            self._proc = subprocess.Popen(
                self.command(binary), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=_child_env(), start_new_session=True, preexec_fn=hook,
            )
        except OSError as exc:
            raise errors.EtcdUnavailable(f"cannot run etcd binary {binary}: {exc}") from exc
        sink = open(self.log_path, "ab")
        with _lock:
            _live.add(self)
        self._tail = collections.deque(maxlen=_TAIL_LINES)
        self._ready, self._settled = threading.Event(), threading.Event()
        self._reader = threading.Thread(target=_pump, args=(self._proc.stdout, sink, self._tail, self._ready,
                                        self._settled), name=f"etcd-output-{self.name}", daemon=True)
        self._reader.start()

    def wait_ready(self, timeout: float = 30.0) -> EtcdServer:
        """Wait for this process's ready line, then for ``/health``; raise EtcdUnavailable if it exits first."""
        deadline = time.monotonic() + timeout
        proc = self._proc
        if proc is None:
            raise errors.EtcdUnavailable(f"etcd {self.name} was never started")
        self._settled.wait(timeout)
        while True:
            if proc.poll() is not None or (self._settled.is_set() and not self._ready.is_set()):
                self._fail_start(None)
            left = deadline - time.monotonic()
            if self._ready.is_set() and health(self.health_url, timeout=max(0.1, min(1.0, left))):
                break
            if left <= 0:
                self._fail_start(f"was not ready within {timeout:g} s")
            time.sleep(_HEALTH_POLL_S)
        self._was_ready = True
        log.debug("etcd %s is ready at %s (pid %d, data in %s)", self.name, self.client_url, proc.pid, self._data_dir)
        return self

    def _fail_start(self, why: str | None):
        self._end(signal.SIGKILL, grace=5.0)  # a no-op when it already exited; then its output is complete
        why = why or f"exited with code {self._proc.returncode} before it was ready"
        tail = "\n".join(self._tail)
        where = f"client {self.client_url}, peer {self.peer_url}"
        raise errors.EtcdUnavailable(f"etcd {self.name} ({where}) {why}; last lines of {self.log_path}:\n{tail}")

    def _signal(self, sig: int) -> None:
        # Only while the leader is unreaped: its pid, the group id, cannot be reused until then.
        if self.running:
            kill_group(self._proc.pid, sig)

    def _end(self, sig: int, grace: float) -> None:
        """Send ``sig`` to the group (waking it if frozen), wait ``grace``, then SIGKILL; reap and drain output."""
        proc = self._proc
        if proc is None:
            return
        self._signal(sig)
        self._signal(signal.SIGCONT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("etcd %s (pid %d) ignored signal %d for %g s; killing it", self.name, proc.pid, sig, grace)
            self._signal(signal.SIGKILL)
            proc.wait()
        self._reader.join(grace)
        self._frozen = False

    def stop(self, timeout: float = 10.0, keep_data: bool = False) -> None:
        """SIGTERM, up to ``timeout`` seconds, SIGKILL; remove a temporary data dir unless ``keep_data``."""
        self._end(signal.SIGTERM, timeout)
        if self._own_data_dir and not keep_data and self._data_dir:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None
        with _lock:
            _live.discard(self)

    def kill(self) -> None:
        """SIGKILL, keeping the data (a crash, for fault tests)."""
        self._end(signal.SIGKILL, grace=10.0)

    def freeze(self) -> None:
        """SIGSTOP; returns once the kernel reports the process stopped."""
        if not self.running:
            return
        self._signal(signal.SIGSTOP)
        _, status = os.waitpid(self._proc.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):  # it ended meanwhile and this wait reaped it
            self._proc.returncode = os.waitstatus_to_exitcode(status)
        self._frozen = True

    def thaw(self) -> None:
        """SIGCONT (a stopped process resumes within the kill call itself)."""
        self._signal(signal.SIGCONT)
        self._frozen = False

    def restart(self, timeout: float = 30.0, hard: bool = False) -> EtcdServer:
        """Stop (or with ``hard`` kill) and start again on the same ports with the same data."""
        if hard:
            self.kill()
        else:
            self.stop(keep_data=True)
        self.cluster_state = "existing"
        return self.start(timeout)

    def __enter__(self) -> EtcdServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EtcdServer({self.name!r}, {self.client_url}, pid={self.pid})"


def _stop_all() -> None:
    with _lock:
        servers = list(_live)
    for server in servers:
        server.stop(timeout=5.0)


atexit.register(_stop_all)
