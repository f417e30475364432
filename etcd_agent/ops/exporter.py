"""``etcd-agent exporter``: the runs under the root as Prometheus metrics, from one watch; it never writes to etcd.

Guarantees:

- Read, then watch: the exporter reads the root prefix (or, with ``--run-id``, each run's prefix, in one txn: one
  revision), puts it into its model (``exporter_model.Model``) and watches from that read's revision + 1 on one
  stream. A compacted revision makes the watch re-read its range (a ``Resync``); a broken stream (etcd restarted,
  a member lost) makes the exporter read everything again and watch anew. Each counts in
  ``etcd_agent_exporter_watch_restarts_total``.
- A scrape renders the model as it is: it asks etcd nothing. ``etcd_agent_exporter_up`` is 1 while the watch has
  heard from etcd (an event or a progress answer) within three probe intervals.
- Only reads: a range read per (re)start, a read of the round key at older revisions per run (its opening and its
  last restart, which the watch did not see), and the watch with its progress requests.

Imports the base modules, ``etcd/``, ``schema/``, ``coord/`` (through ``exporter_model``) and, lazily,
prometheus_client (the ``metrics`` extra); never ``node/`` or the agent.
"""

from __future__ import annotations

import queue
import signal
import threading
import time

from .. import logs
from ..errors import ConfigError, EtcdError
from ..etcd.client import Etcd, op_get_at, op_get_prefix, prefix_end
from ..etcd.watch import Resync, WatchStream
from ..schema.keys import RunKeys
from .exporter_model import CAUSES, PHASES, Model

log = logs.get("etcd_agent.ops.exporter")
PROBE_INTERVAL = 2.0  # seconds between the watch's progress requests: how soon a silent etcd counts as down
OUTCOMES = ("succeeded", "failed", "stopped")


class Follower:
    """Keeps ``model`` current with the ranges under ``prefixes`` through one watch stream."""

    def __init__(self, etcd: Etcd, model: Model, prefixes: list[str], probe: float = PROBE_INTERVAL):
        self.etcd, self.model, self.prefixes, self.probe = etcd, model, prefixes, probe
        self.deliveries: queue.SimpleQueue = queue.SimpleQueue()
        self.stream: WatchStream | None = None
        self.restarts = 0  # watch restarts: re-reads after a compaction or a broken stream
        self.heard = 0.0  # monotonic time etcd last answered on the watch (0: not since the last read)
        self._resumes = 0

    def up(self) -> bool:
        return self.stream is not None and time.monotonic() - self.heard < 3 * self.probe

    def _sink(self, name: str, _token: int, delivery) -> None:
        self.heard = time.monotonic()
        self.deliveries.put((int(name), delivery))

    def _heard(self, _revision: int) -> None:
        self.heard = time.monotonic()

    def start(self) -> None:
        """Read every range in one txn, put it into the model, and watch each from the read's revision + 1."""
        self.stop_watch()
        res = self.etcd.txn([], [op_get_prefix(p) for p in self.prefixes], where="read the runs")
        for prefix, kvs in zip(self.prefixes, res.ranges):
            self.model.reset(prefix, kvs, res.revision)
        self._backfill()
        stream = WatchStream(self.etcd, self._sink, self.probe, name="exporter-watch", on_progress=self._heard)
        for i, prefix in enumerate(self.prefixes):
            stream.add(str(i), prefix, prefix_end(prefix), res.revision + 1)
        self.heard, self._resumes, self.stream = time.monotonic(), 0, stream.start()
        log.info("following %d run(s) under %s from revision %d", len(self.model.runs), self.model.root,
                 res.revision + 1)

    def _backfill(self) -> None:
        """The round values the model needs but did not see (the read has only the newest): the current round's
        opening (the value before it ran) and the round opened with the last restart. A compacted revision leaves
        them out."""
        with self.model.lock:
            wanted = []
            for run_id, rm in self.model.runs.items():
                gen = rm.generation()
                kv = rm.kvs.get(rm.run.generation(gen).round()) if gen else None
                if kv is None:
                    continue
                restarts = rm.kvs.get(rm.run.generation(gen).restarts())
                revs = {kv.mod_revision - 1} | ({restarts.mod_revision} if restarts and restarts.version > 1 else set())
                wanted += [(run_id, gen, kv.key, rev) for rev in revs if rev > 0 and (gen, rev) not in rm.rounds]
        for run_id, gen, key, rev in wanted:
            try:
                res = self.etcd.txn([], [op_get_at(key, rev)], where=f"read {key} at revision {rev}")
            except EtcdError as exc:  # compacted, most likely: that part of the history is gone
                log.debug("cannot read %s at revision %d: %s", key, rev, exc)
                continue
            if res.ranges[0]:
                self.model.note_round(run_id, gen, res.ranges[0][0])

    def stop_watch(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None
        self.deliveries = queue.SimpleQueue()

    def step(self, timeout: float) -> None:
        """Apply what the watch delivered within ``timeout`` seconds; read again after a broken stream."""
        if self.stream is not None and self.stream.resumes > self._resumes:
            log.warning("the watch on %s broke (etcd restarted or unreachable?); reading everything again",
                        self.model.root)
            self.restarts += 1
            self.start()
            return
        try:
            index, delivery = self.deliveries.get(timeout=timeout)
        except queue.Empty:
            return
        if isinstance(delivery, Resync):
            log.warning("etcd compacted the revisions the watch needed; read %s again at revision %d",
                        self.prefixes[index], delivery.revision)
            self.restarts += 1
            self.model.reset(self.prefixes[index], delivery.kvs, delivery.revision)
            self._backfill()
        else:
            self.model.apply(delivery)

    def run(self, stop: threading.Event) -> None:
        """Follow until ``stop`` is set; an etcd that cannot be read is tried again every probe interval."""
        while not stop.is_set():
            try:
                if self.stream is None:
                    self.start()
                self.step(self.probe)
            except EtcdError as exc:
                log.warning("cannot read %s from etcd (%s); trying again", self.model.root, exc)
                self.stop_watch()
                self.restarts += 1
                stop.wait(self.probe)


class Collector:
    """A prometheus_client collector: each scrape renders the model as it is then."""

    def __init__(self, model: Model, follower: Follower, retention: float):
        self.model, self.follower, self.retention = model, follower, retention

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def gauge(name, doc, labels=("run", "job")):
            fams[name] = GaugeMetricFamily(f"etcd_agent_{name}", doc, labels=list(labels))
            return fams[name]

        fams: dict = {}
        up = gauge("exporter_up", "1 while the exporter's watch hears from etcd", ())
        up.add_metric([], 1.0 if self.follower.up() else 0.0)
        restarts = CounterMetricFamily("etcd_agent_exporter_watch_restarts", "times the exporter read everything "
                                       "again (a compaction, a broken watch, etcd unreachable)", labels=[])
        restarts.add_metric([], float(self.follower.restarts))
        gauge("exporter_revision", "the etcd revision the exporter's model is at", ()).add_metric(
            [], float(self.model.revision))
        phase = gauge("job_phase", "1 for the phase the job is in (forming, running, ended)", ("run", "job", "phase"))
        result = gauge("job_result", "1 for an ended job's outcome", ("run", "job", "outcome"))
        abandoned = gauge("job_abandoned", "1 for an ended job that was ended because no agent was left")
        rnd = gauge("job_round", "the job's current round")
        used = gauge("job_restarts_used", "restarts the job has used")
        allowed = gauge("job_restarts_max", "restarts the job may use (--max-restarts)")
        counts = {n: gauge(f"job_nodes_{n}", doc) for n, doc in (
            ("alive", "registered nodes (a live agent)"), ("planned", "nodes in the current round's plan"),
            ("waiting", "registered nodes outside the plan, spares aside"),
            ("spare", "registered --spare nodes outside the plan"), ("quarantined", "quarantined nodes"))}
        quarantined = gauge("node_quarantined", "1 while the node sits out in quarantine", ("run", "job", "node"))
        world = gauge("job_world_size", "workers in the current round's plan")
        formed = gauge("job_round_formation_seconds", "seconds the current round took to form (opened to planned)")
        restarted = gauge("job_last_restart_timestamp_seconds", "when the job's last restart was counted")
        failure = gauge("job_last_failure", "1 for the cause class of the job's last failure", ("run", "job", "cause"))
        step_min = gauge("job_step_min", "the lowest training step a node of the job reported (newest round)")
        step_max = gauge("job_step_max", "the highest training step a node of the job reported (newest round)")
        rate = gauge("job_steps_per_second", "the median of the nodes' training step rates")
        stalled = gauge("job_no_progress_restarts", "restarts in a row without a new step (--max-no-progress-restarts)")
        slow = gauge("job_stragglers", "nodes slower than the median step rate by more than --straggler-threshold")
        straggler = gauge("node_straggler", "1 while the node is a straggler", ("run", "job", "node"))
        for v in self.model.views(time.time(), self.retention):
            job = [v.run, str(v.gen)]
            for p in PHASES:
                phase.add_metric([*job, p], 1.0 if v.phase == p else 0.0)
            if v.outcome is not None:
                for o in OUTCOMES:
                    result.add_metric([*job, o], 1.0 if v.outcome == o else 0.0)
                abandoned.add_metric(job, 1.0 if v.abandoned else 0.0)
            for fam, value in ((rnd, v.round), (used, v.restarts_used), (allowed, v.restarts_max),
                               (world, v.world_size), (formed, v.formation_s), (restarted, v.last_restart),
                               (step_min, v.step_min), (step_max, v.step_max), (rate, v.steps_per_second),
                               (stalled, v.stalled), (slow, len(v.stragglers) if v.step_min is not None else None)):
                if value is not None:
                    fam.add_metric(job, float(value))
            for name, value in (("alive", v.alive), ("planned", v.planned), ("waiting", v.waiting),
                                ("spare", v.spares), ("quarantined", len(v.quarantined))):
                counts[name].add_metric(job, float(value))
            for node in v.quarantined:
                quarantined.add_metric([*job, node], 1.0)
            for node in v.stragglers:  # only the stragglers: the label set stays small
                straggler.add_metric([*job, node], 1.0)
            if v.last_failure is not None:
                for c in CAUSES:
                    failure.add_metric([*job, c], 1.0 if v.last_failure == c else 0.0)
        yield restarts
        yield from fams.values()


def prefixes(root: str, run_ids: list[str]) -> list[str]:
    """The ranges to follow: the root, or each named run's prefix."""
    return [RunKeys(root, r).prefix for r in run_ids] if run_ids else [root + "/"]


DEFAULT_LISTEN = "127.0.0.1:9464"
DEFAULT_RETENTION = 3600.0  # seconds an ended job's run stays exported after its result


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` of ``--listen``; ConfigError names the flag."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host, int(port)


def run_ids(text: str | None) -> list[str]:
    """The runs ``--run-id`` names, comma-separated (none: every run)."""
    return sorted({r.strip() for r in (text or "").split(",") if r.strip()})


def run_exporter(ns, etcd: Etcd) -> int:
    """``etcd-agent exporter``: serve ``/metrics`` on ``--listen`` until SIGTERM or SIGINT."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.process_collector import ProcessCollector
    except ImportError as exc:
        raise ConfigError("etcd-agent exporter needs prometheus-client: pip install 'etcd-agent[metrics]'") from exc
    if ns.retention <= 0:
        raise ConfigError(f"--retention must be positive, got {ns.retention:g}")
    host, port = listen_address(ns.listen)
    model = Model(ns.root)
    follower = Follower(etcd, model, prefixes(ns.root, run_ids(ns.run_id)))
    follower.start()  # etcd unreachable at start: a usage problem (exit 2), as for status
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(Collector(model, follower, ns.retention))
    try:
        server, _thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"--listen {ns.listen}: cannot listen there: {exc.strerror or exc}") from exc
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.info("serving metrics on http://%s:%d/metrics", host, server.server_address[1])
    try:
        follower.run(stop)
    finally:
        signal.signal(signal.SIGTERM, previous)
        follower.stop_watch()
        server.shutdown()
    return 0
