"""etcd members in containers for the tests, behind the interface of ``etcd_agent.etcd.server``.

With ``ETCD_AGENT_TEST_DOCKER=1``, ``member_class(EtcdServer)`` (or of ``tls.TlsEtcd``) is a subclass whose etcd runs
in a container started through testcontainers, and ``cluster(...)`` an ``EtcdCluster`` of such members; without
it they are the process classes themselves. A container member keeps everything of the process member: the same
command line, the same free loopback ports (host networking: the container listens on this machine's loopback and
nothing else; no bridge, no private address range), the same data directory (bind-mounted at its own path, as are
the directories of files its flags name, read-only), its output in the same log file. Faults go through the
container runtime: ``freeze``/``thaw`` are ``docker pause``/``unpause``, ``kill`` is ``docker kill``, and a
restart is ``docker start`` of the same container with the same data. ``stop`` removes the container; the
containers a test left are removed when the session ends (testcontainers' reaper is off: its image cannot be
pulled without a registry).

The engine and the image come from ``tools/``: ``dockerd.sh`` starts Debian's dockerd if none answers (as root),
``etcd-image.sh`` builds ``etcd-agent/etcd:<version>`` from the etcd binary the process members would run
(``$ETCD_AGENT_ETCD_BIN`` or ``etcd`` on PATH) unless ``$ETCD_AGENT_TEST_IMAGE`` names an image. Where either
cannot be had (not root, no dockerd), ``member_class`` skips the test and says why.
"""

from __future__ import annotations

import atexit
import collections
import os
import signal
import subprocess
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from etcd_agent import errors
from etcd_agent.etcd import server as standalone
from etcd_agent.testing.cluster import EtcdCluster

SWITCH = "ETCD_AGENT_TEST_DOCKER"
IMAGE_ENV = "ETCD_AGENT_TEST_IMAGE"
TOOLS = Path(__file__).resolve().parent.parent / "tools"
ETCD_IN_IMAGE = "/usr/local/bin/etcd"  # where etcd's own images and tools/etcd-image.sh put it

_engine: dict[str, str] = {}  # "image" once the engine answers and the image exists, else "skip": why not
_classes: dict[type, type] = {}
_created: set[ContainerMember] = set()


def enabled() -> bool:
    return os.environ.get(SWITCH) == "1"


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def _prepare() -> dict[str, str]:
    """Start the engine if none answers and build the image: {"image": tag} or {"skip": why}."""
    try:
        import docker  # noqa: F401
        import testcontainers  # noqa: F401
    except ImportError as exc:
        return {"skip": f"{SWITCH}=1 but {exc.name} is not installed (the project's test extra has it)"}
    if _run("docker", "info").returncode != 0:
        if os.geteuid() != 0:
            return {"skip": f"{SWITCH}=1 but no Docker engine answers and only root can start one (tools/dockerd.sh)"}
        started = _run(str(TOOLS / "dockerd.sh"))
        if started.returncode != 0:
            return {"skip": f"{SWITCH}=1 but tools/dockerd.sh could not start dockerd: {started.stderr.strip()}"}
    if os.environ.get(IMAGE_ENV):
        return {"image": os.environ[IMAGE_ENV]}
    built = _run(str(TOOLS / "etcd-image.sh"), standalone.find_etcd_binary())
    if built.returncode != 0:
        raise errors.EtcdUnavailable(f"tools/etcd-image.sh failed: {built.stderr.strip()}")
    return {"image": built.stdout.strip()}


def image() -> str:
    """The image the members run; skips the calling test where no engine can be had."""
    if not _engine:
        _engine.update(_prepare())
    if "skip" in _engine:
        pytest.skip(_engine["skip"])
    return _engine["image"]


def member_class(base: type = standalone.EtcdServer) -> type:
    """``base`` itself, or with the switch on its container variant (made once per base)."""
    if not enabled():
        return base
    tag = image()
    if base not in _classes:
        _classes[base] = type(f"Container{base.__name__}", (ContainerMember, base), {"image": tag})
    return _classes[base]


def cluster(*args, **kwargs) -> EtcdCluster:
    """``EtcdCluster(*args, **kwargs)``, its members in containers when the switch is on."""
    made = EtcdCluster(*args, **kwargs)
    if enabled():
        for member in made.members:
            member.__class__ = member_class(type(member))
    return made


def _epoch(stamp: str) -> float:
    """Docker's RFC 3339 time with nanoseconds as seconds since the epoch (microseconds kept)."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp()


def _pump(stream, log_path: str, tail, ready: threading.Event) -> None:
    """Copy a container's output to the member's log file line by line; set ``ready`` at etcd's ready line."""
    pending = b""
    with open(log_path, "ab") as sink:
        for chunk in stream:
            sink.write(chunk)
            sink.flush()
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                tail.append(line.decode(errors="replace").rstrip())
                if any(marker in tail[-1] for marker in standalone._READY_MARKERS):
                    ready.set()


class ContainerMember:
    """Mixed in before ``EtcdServer`` (or a subclass): the member's etcd runs in a container of ``image``."""

    image = ""
    _container = None  # testcontainers' DockerContainer, from the first spawn until stop() removes it
    _reader = None

    def _wrapped(self):
        return self._container.get_wrapped_container() if self._container else None

    def _state(self) -> dict:
        wrapped = self._wrapped()
        if wrapped is None:
            return {}
        import docker.errors

        try:
            wrapped.reload()
        except docker.errors.NotFound:
            return {}
        return wrapped.attrs["State"]

    running = property(lambda self: bool(self._state().get("Running")))
    pid = property(lambda self: self._state().get("Pid") or None)

    def _mounts(self, command: list[str]) -> dict[str, str]:
        """The data directory read-write, and the directory of each file a flag names read-only."""
        mounts = {self._data_dir: "rw"}
        for arg in command:
            value = arg.partition("=")[2]
            if value.startswith("/") and os.path.isfile(value) and not value.startswith(self._data_dir + "/"):
                mounts.setdefault(os.path.dirname(value), "ro")
        return mounts

    def spawn(self) -> None:
        """``docker start`` of this member's container, made (with the member's command) on the first spawn."""
        if self.running:
            return
        if self._data_dir is None:
            self._data_dir = tempfile.mkdtemp(prefix=f"{self.name}-")
        os.makedirs(self._data_dir, exist_ok=True)
        if self._container is None:
            os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
            from testcontainers.core.container import DockerContainer

            command = self.command(ETCD_IN_IMAGE)
            container = DockerContainer(self.image).with_command(command).with_kwargs(network="host")
            for path, mode in self._mounts(command).items():
                container.with_volume_mapping(path, path, mode)
            self._container = container
            _created.add(self)
            container.start()
        else:
            self._wrapped().start()
        with standalone._lock:
            standalone._live.add(self)
        since = _epoch(self._state()["StartedAt"])
        self._tail = collections.deque(maxlen=standalone._TAIL_LINES)
        self._ready = threading.Event()
        stream = self._wrapped().logs(stream=True, follow=True, since=since)
        self._reader = threading.Thread(target=_pump, args=(stream, self.log_path, self._tail, self._ready),
                                        name=f"etcd-output-{self.name}", daemon=True)
        self._reader.start()

    def wait_ready(self, timeout: float = 30.0) -> ContainerMember:
        """Wait for this container's ready line, then for ``/health``; fail if the container ends first."""
        deadline = time.monotonic() + timeout
        if self._container is None:
            raise errors.EtcdUnavailable(f"etcd {self.name} was never started")
        while True:
            if not self.running:
                self._fail_start(f"exited with code {self._state().get('ExitCode')} before it was ready")
            left = deadline - time.monotonic()
            if self._ready.is_set() and standalone.health(self.health_url, timeout=max(0.1, min(1.0, left))):
                break
            if left <= 0:
                self._fail_start(f"was not ready within {timeout:g} s")
            self._ready.wait(standalone._HEALTH_POLL_S)
        self._was_ready = True
        return self

    def _fail_start(self, why: str | None):
        self._remove()  # a retry on fresh ports makes a new container with the new command
        tail = "\n".join(self._tail or ())
        raise errors.EtcdUnavailable(f"etcd {self.name} in a container ({self.client_url}, peer {self.peer_url}) "
                                     f"{why}; last lines of {self.log_path}:\n{tail}")

    def _end(self, sig: int, grace: float) -> None:
        """``docker kill`` (SIGKILL) or ``docker stop`` (SIGTERM, ``grace``, SIGKILL), a paused container first
        unpaused; waits for its end and its output."""
        wrapped = self._wrapped()
        if wrapped is None or not self.running:
            self._frozen = False
            return
        if self._state().get("Paused"):
            wrapped.unpause()
        if sig == signal.SIGKILL:
            wrapped.kill()
        else:
            wrapped.stop(timeout=int(max(1, grace)))
        wrapped.wait(timeout=grace + 30)
        if self._reader:
            self._reader.join(grace)
        self._frozen = False

    def _remove(self) -> None:
        if self._container is not None:
            self._container.stop()  # testcontainers' stop: remove with force
            if self._reader:
                self._reader.join(10)
            self._container = None
        _created.discard(self)

    def stop(self, timeout: float = 10.0, keep_data: bool = False) -> None:
        """``docker stop``; unless ``keep_data`` (a restart follows) the container and a temporary data dir go."""
        if not keep_data:
            self._end(signal.SIGTERM, timeout)
            self._remove()
        super().stop(timeout, keep_data)

    def freeze(self) -> None:
        """``docker pause``: every process of the container stopped by the cgroup freezer when it returns."""
        if self.running:
            self._wrapped().pause()
            self._frozen = True

    def thaw(self) -> None:
        if self._state().get("Paused"):
            self._wrapped().unpause()
        self._frozen = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.client_url}, image={self.image})"


@atexit.register
def _remove_left() -> None:
    for member in list(_created):
        member._remove()
