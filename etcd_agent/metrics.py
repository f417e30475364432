"""This agent's Prometheus metrics (``--metrics-port``): what only the agent sees, served over HTTP by
prometheus-client. The hooks sit where the events already are (the etcd call path, the watch, the session, the
worker group's exits, the agent's ``_enter``); each is one call into this module.

Guarantees:

- Off (the default, port 0) costs nothing: no registry, no server, and ``prometheus_client`` is never imported;
  every hook reads one module global and returns (``timed`` hands back the very function it was given).
- ``start`` makes one registry for this process and serves it on ``HOST:PORT/metrics`` (``HOST``: ``--local-addr``
  when given, else every interface). Without the library installed, or with the port taken, it raises a
  ConfigError naming the flag, before the agent joins its job.
- Every series has the labels ``run`` and ``node`` and at most one more whose values are a fixed, short list
  (``state``, ``cause``, ``error``): nothing per rank, key or round, so the series are bounded.
- Gauges about the present (workers by state, the last progress beat's age, spares ready, round) are computed at
  scrape time from what the owners registered (``track_workers``, ``track_spares``, ``agent_state``); counters
  count events as the hooks hear them. A hook never raises into its caller.
- One agent per process: the labels are those of the agent that started the server.

A base module: imports the standard library, ``errors`` and ``progress``, and ``prometheus_client`` only inside
``start``; every layer may import it.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from .errors import ConfigError, EtcdError
from .progress import last_progress

T = TypeVar("T")
S = TypeVar("S")
PREFIX = "etcd_agent_agent_"
EXTRA = "metrics"  # the optional dependency that brings prometheus-client: pip install 'etcd-agent[metrics]'
AGENT_STATES = ("starting", "rendezvous", "running", "fenced", "finished")  # agent.State's values, in order
EXIT_CAUSES = ("success", "exit_code", "signal", "hang", "stopped")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
if TYPE_CHECKING:  # for annotations only: importing this module builds no typing objects
    # the current round's workers, each as (its heartbeat file, the wall time of its start, whether it has exited)
    WorkerList = Callable[[], Sequence[tuple[str, float, bool]]]


class _Metrics:
    """The registry and its series, made by ``start``; ``prom`` is the prometheus_client module."""

    def __init__(self, prom: Any, run: str, node: str):
        self.registry = reg = prom.CollectorRegistry()
        self.server: Any = None
        self.workers: WorkerList = lambda: ()
        self.spares: Callable[[], int] = lambda: 0
        self.where: Any = None  # the agent's logs.Where: its round, read at scrape time
        base = {"run": run, "node": node}

        def series(kind, name: str, doc: str, extra: str = "", **kw):
            names = ("run", "node", extra) if extra else ("run", "node")
            metric = kind(PREFIX + name, doc, names, registry=reg, **kw)
            return (lambda value: metric.labels(**base, **{extra: value})) if extra else metric.labels(**base)

        workers = series(prom.Gauge, "workers", "This node's workers of the current round, by state", "state")
        workers("running").set_function(lambda: sum(not done for _, _, done in self.workers()))
        workers("stopped").set_function(lambda: sum(done for _, _, done in self.workers()))
        series(prom.Gauge, "progress_age_seconds", "Seconds since the newest progress beat (or start) of any "
               "running local worker; NaN while none runs").set_function(self._beat_age)
        self.exits = series(prom.Counter, "worker_exits", "Worker exits by cause: success, exit_code, signal (of "
                            "its own), hang (detected), stopped (by the agent)", "cause")
        for cause in EXIT_CAUSES:
            self.exits(cause)  # every cause shows, at 0 until it happens
        self.fencings = series(prom.Counter, "fencings", "Sessions lost: this node's workers were stopped")
        self.latency = series(prom.Histogram, "etcd_request_duration_seconds", "Latency of each etcd request try "
                              "(unary calls; retries are tries of their own)", buckets=BUCKETS)
        self.errors = series(prom.Counter, "etcd_request_errors", "etcd request tries that failed, by error",
                             "error")
        self.watch_reconnects = series(prom.Counter, "watch_reconnects", "Watch streams resumed after a break")
        self.keepalive_failures = series(prom.Counter, "keepalive_failures", "Lease keepalives that failed")
        self.session_losses = series(prom.Counter, "session_losses", "Sessions declared lost by their keepalive")
        series(prom.Gauge, "spares_ready", "Warm spares standing by (--warm-restart)").set_function(
            lambda: self.spares())
        series(prom.Gauge, "round", "The round this agent is in (0: none yet)").set_function(
            lambda: getattr(self.where, "round", 0) or 0)
        self.state = series(prom.Enum, "state", "The agent's state", states=list(AGENT_STATES))

    def _beat_age(self) -> float:
        beats = [last_progress(path, started) for path, started, done in self.workers() if not done]
        return time.time() - max(beats) if beats else math.nan


_on: _Metrics | None = None  # None: metrics are off


def start(port: int, host: str, run: str, node: str, flag: str = "--metrics-port") -> str:
    """Serve the metrics on ``host`` (empty: every interface) and ``port``; returns the URL, or "" when ``port``
    is 0 (off). A ConfigError naming ``flag`` when prometheus-client is missing or the port cannot be bound."""
    global _on
    if not port:
        return ""
    try:
        import prometheus_client as prom
    except ImportError as exc:
        raise ConfigError(f"{flag} {port} needs the prometheus-client package, which is not installed: pip install "
                          f"'etcd-agent[{EXTRA}]'") from exc
    prom.disable_created_metrics()  # a counter's _created series is noise here
    m = _Metrics(prom, run, node)
    addr = host or "0.0.0.0"
    try:
        started = prom.start_http_server(port, addr, registry=m.registry)  # (server, thread) since 0.20
    except OSError as exc:
        raise ConfigError(f"{flag} {port}: cannot serve metrics on {addr} port {port}: "
                          f"{exc.strerror or exc}") from exc
    m.server = started[0] if isinstance(started, tuple) else None
    _on = m
    return f"http://{addr if ':' not in addr else f'[{addr}]'}:{port}/metrics"


def stop() -> None:
    """Stop serving (the agent exits; tests); metrics are off again."""
    global _on
    m, _on = _on, None
    if m is not None and m.server is not None:
        m.server.shutdown()
        m.server.server_close()


def enabled() -> bool:
    return _on is not None


# --- hooks: each is a no-op while metrics are off -------------------------------------------------------------
def timed(attempt: Callable[[], T]) -> Callable[[], T]:
    """One etcd request try, timed into the latency histogram and counted as an error when it raises."""
    m = _on
    if m is None:
        return attempt

    def timed_attempt() -> T:
        began = time.monotonic()
        try:
            return attempt()
        except Exception as exc:
            m.errors(type(exc).__name__ if isinstance(exc, EtcdError) else "other").inc()
            raise
        finally:
            m.latency.observe(time.monotonic() - began)
    return timed_attempt


def watch_resumed() -> None:
    if _on is not None:
        _on.watch_reconnects.inc()


def keepalive_failed() -> None:
    if _on is not None:
        _on.keepalive_failures.inc()


def session_lost() -> None:
    if _on is not None:
        _on.session_losses.inc()


def worker_exited(returncode: int, own: bool) -> None:
    """A worker's exit; ``own``: it ended before any stop signalled it (else the agent's stop ended it)."""
    if _on is not None:
        cause = "stopped" if not own else "success" if returncode == 0 else "signal" if returncode < 0 else \
            "exit_code"
        _on.exits(cause).inc()


def worker_hung() -> None:
    """``--worker-timeout`` found a worker silent too long (the agent then stops it: that exit is ``stopped``)."""
    if _on is not None:
        _on.exits("hang").inc()


def track_workers(workers: WorkerList) -> None:
    """The current round's workers, read at each scrape (the worker group calls this when it starts a round)."""
    if _on is not None:
        _on.workers = workers


def track_spares(ready: Callable[[], int]) -> None:
    """How many warm spares are ready, read at each scrape."""
    if _on is not None:
        _on.spares = ready


def agent_state(state: S, where: Any) -> S:
    """The agent enters ``state`` (an ``agent.State``), which is returned; ``where`` (its ``logs.Where``) gives the
    round at scrape time. Entering ``fenced`` counts a fencing."""
    m = _on
    if m is not None:
        m.where = where
        m.state.state(state.value)
        if state.value == "fenced":
            m.fencings.inc()
    return state
