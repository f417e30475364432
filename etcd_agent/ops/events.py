"""``etcd-agent events``: a job's history, replayed from etcd's own revisions.

Events are not keys of their own: every change of a job (a round opened or closed, a node registered or gone, a
join, an exit, a failure report, a restart counted, the result) is already a revision of one of its keys, and etcd
keeps each key's history until it is compacted. So the history costs no write on the job's path and cannot
disagree with the job's state; its retention is etcd's (``--auto-compaction-retention``): after a compaction the
replay starts at the oldest revision etcd still has and says so. ``events`` watches the job prefix from the
revision that created the job's spec up to the current revision and prints one line per change (``--json``: one
object per line); ``--follow`` keeps watching and prints each change as it happens until the job has a result.

A node's progress put (``P/progress/<node>``) is an entry that also says the job's step and rate as of then; a
change in who straggles (``--straggler-threshold``, as the job's spec records it) is an entry of its own.

Imports ``etcd/`` (client, watch), ``schema/``, ``coord.txns`` and ``coord.progress`` (``--plot``: ``ops.timeline``,
only then); reads only; never ``node/`` or the agent.
"""

from __future__ import annotations

import json
import queue
import time

from ..coord import txns
from ..coord.progress import summarize
from ..errors import BadKeyData, ConfigError
from ..etcd.client import Etcd
from ..schema.keys import RunKeys
from ..schema.codec import Record
from ..schema.values import NodeInfo, Phase, Progress, SpecValue, read_value
from ..etcd.watch import Resync, Watch


def describe(kind: str, parsed, value: Record | None, prev_exists: bool) -> dict | None:
    """One history entry for a change of a key of ``kind`` (``value`` None: deleted), or None for changes nobody
    needs."""
    if kind == "round" and value is not None:
        if value.phase == Phase.JOINING:
            return {"event": "round opened", "round": value.number, "reason": value.reason}
        if value.phase == Phase.RUNNING:
            return {"event": "round closed", "round": value.number, "members": value.reason}
        return {"event": "job ended", "round": value.number, "phase": value.phase.value, "reason": value.reason}
    if kind == "node":
        if value is None:
            return {"event": "node gone", "node": parsed.node,
                    "why": "its lease ended (it stopped, or was lost) or was revoked"}
        if not prev_exists:
            return {"event": "node registered", "node": parsed.node, "host": value.host, "pid": value.pid,
                    **({"health": value.health} if value.health else {})}
        if value.health:
            return {"event": "node unhealthy", "node": parsed.node, "health": value.health}
        return {"event": "node healthy", "node": parsed.node}
    if kind == "join":
        if value is None:
            return {"event": "left round", "round": parsed.round, "node": parsed.node,
                    "why": "its join key vanished (lease ended, or it moved to the next round)"}
        return {"event": "joined round", "round": parsed.round, "node": parsed.node} if not prev_exists else None
    if kind == "quarantine" and value is not None and value.until and not value.failures:
        return {"event": "quarantined", "node": parsed.node, "until": value.until, "reason": value.reason}
    if kind == "plan" and value is not None:
        return {"event": "plan", "round": parsed.round, "members": value.nodes,
                "master": f"{value.master_addr}:{value.master_port}"}
    if kind == "exit" and value is not None:
        return {"event": "node finished", "round": parsed.round, "node": parsed.node}
    if kind == "failure" and value is not None and value.lost:
        return {"event": "node lost", "round": parsed.round, "node": parsed.node, "lost": True,
                "message": value.message, "cause": f"round {parsed.round}'s failure is attributed to {parsed.node}"}
    if kind == "failure" and value is not None:
        return {"event": "failure", "round": parsed.round, "node": parsed.node, "rank": value.rank,
                "how": value.how_it_ended(), "message": value.headline, "step": value.step}
    if kind == "restarts" and value is not None and value.used:
        stalled = {"stalled": value.stalled, "best_step": value.best_step} if value.stall_limit else {}
        return {"event": "restart counted", "used": value.used, "max": value.max, **stalled}
    if kind == "progress" and value is not None:
        return {"event": "progress", "round": value.round, "node": parsed.node, "step": value.step, "rate": value.rate}
    if kind == "result" and value is not None:
        return {"event": "result", "outcome": value.outcome.value, "round": value.round, "reason": value.reason}
    return None


def _time_of(value: Record | None, created: bool) -> float | None:
    """When a value was written, as it says itself; a registration's start time only where the put created the key
    (a later put of it, a health change, is not that old)."""
    if isinstance(value, NodeInfo):
        return (value.started or None) if created else None
    return getattr(value, "time", None) or None


DETAILS = {  # what each kind of entry says beyond its time, revision, kind and node (``describe``'s fields)
    "round opened": "round {round}: {reason}",
    "round closed": "round {round} running with {members}",
    "plan": "round {round}: {member_list} (master {master})",
    "job ended": "{phase} in round {round}: {reason}",
    "node registered": "host {host}, pid {pid}",
    "node gone": "{why}",
    "node unhealthy": "does not join: {health}",
    "node healthy": "passed its health check: it joins again",
    "quarantined": "until {until_text}: {reason}",
    "joined round": "round {round}",
    "left round": "round {round}: {why}",
    "node finished": "round {round}: its workers all exited 0",
    "failure": "round {round}: rank {rank} {how}{said}",
    "node lost": "round {round}: {message} (the round's failure is attributed to it)",
    "restart counted": "{used} of {max}{stall_text}",
    "progress": "round {round}: step {step} at {rate:.3g} steps/s; job: {job}",
    "stragglers": "round {round}: {straggler_text} (median {median:.3g} steps/s, --straggler-threshold {threshold:g})",
    "result": "{outcome} in round {round}: {reason}",
    "history compacted": "{note}",
}
TIME_WIDTH, REVISION_WIDTH, KIND_WIDTH, NODE_WIDTH = 19, 8, max(map(len, DETAILS)), 16
HEADER = f"{'TIME':{TIME_WIDTH}}  {'REVISION':>{REVISION_WIDTH}}  {'EVENT':{KIND_WIDTH}}  {'NODE':{NODE_WIDTH}}  DETAIL"


def when(wall: float | None) -> str:
    """A wall time as a person reads it ("-": none); one no calendar shows (a time written by hand, say) as the
    number it is."""
    if not wall:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))
    except (OverflowError, ValueError, OSError):
        return f"{wall:g} s after 1970"


def line(entry: dict) -> str:
    """One row under ``HEADER``: time, revision, kind and node in fixed-width columns ("-" where an entry has no
    time or no node), then the detail. A longer node id moves only its own row's detail."""
    fields = {**entry, "member_list": ", ".join(entry.get("members") or ()), "until_text": when(entry.get("until")),
              "said": f": {entry['message']}" if entry.get("message") else "",
              "stall_text": f"; {entry['stalled']} in a row without a step beyond {entry['best_step']}"
              if entry.get("stalled") else "",
              "straggler_text": ", ".join(f"{n} ({r:.3g} steps/s)" for n, r in entry.get("nodes", {}).items())
              or "no straggler any more"}
    fmt = DETAILS.get(entry["event"])
    detail = fmt.format(**fields) if fmt else json.dumps(entry, sort_keys=True)
    return (f"{when(entry.get('time')):{TIME_WIDTH}}  {entry['revision']:>{REVISION_WIDTH}}  "
            f"{entry['event']:{KIND_WIDTH}}  {entry.get('node') or '-':{NODE_WIDTH}}  {detail}")


def replay(etcd: Etcd, run: RunKeys, follow: bool, emit, timeout: float | None = None) -> int:
    """Emit the history of the run's current job (``emit(entry)``): every change from the revision that created
    its spec. Without ``follow`` up to the revision current when the replay began (etcd's progress answer on the
    watch says when every change up to it has arrived); with ``follow`` until the job has a result, or ``timeout``
    seconds pass. Returns the number of entries emitted."""
    keys = txns.current_job(etcd, run)
    if keys is None:
        raise ConfigError(f"--run-id {run.run_id}: no job under {run.prefix} at {etcd.endpoints_text}")
    spec, head = etcd.get(keys.spec())
    if spec is None:
        raise BadKeyData(keys.spec(), "missing: the job has no spec")
    deliveries: queue.SimpleQueue = queue.SimpleQueue()
    watch = Watch(etcd, keys.prefix, spec.create_revision, deliveries.put, probe_interval=PROGRESS_PROBE,
                  name="events", on_progress=lambda rev: deliveries.put(rev)).start()
    known: set[str] = set()  # keys that exist, as far as the replay has seen
    steps = Steps(SpecValue.from_kv(spec).straggler_threshold or 0.0)
    count = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                batch = deliveries.get(timeout=left)
            except queue.Empty:
                break
            if isinstance(batch, int):  # a progress answer: every change up to that revision has arrived
                if not follow and batch >= head:
                    break
                continue
            if isinstance(batch, Resync):
                emit({"event": "history compacted", "revision": batch.revision, "time": None,
                      "note": "etcd compacted older revisions: the replay goes on from what it still has"})
                known = {kv.key for kv in batch.kvs}
                continue
            ended = False
            # a node's join of the next round deletes its join key of the last one in the same txn: not a leave
            moved = {(ev.kv.mod_revision, ev.key.rsplit("/", 1)[1]) for ev in batch
                     if ev.kind == "put" and "/join/" in ev.key}
            changes = []
            for ev in batch:
                try:
                    parsed = keys.parse(ev.key)
                    value = read_value(parsed.kind, ev.kv) if ev.kind == "put" else None
                except BadKeyData:
                    continue  # not a key or value of the schema (planted by hand, say): not history
                changes.append((ev, parsed, value))
            # a plan's parts are written with its header, in one txn: the plan event names every member
            parts: dict[int, list] = {}
            for _ev, parsed, value in changes:
                if parsed.kind == "plan_part" and value is not None:
                    parts.setdefault(parsed.round, []).append(value)
            for i, (ev, parsed, value) in enumerate(changes):
                if parsed.kind == "plan" and value is not None:
                    try:
                        changes[i] = (ev, parsed, value.with_parts(ev.key, parts.get(parsed.round, ())))
                    except BadKeyData:
                        pass  # bad parts: the event names the members it can
            times = {}
            for ev, _parsed, value in changes:
                t = _time_of(value, ev.kv.version == 1)
                if t and ev.kv.mod_revision not in times:
                    times[ev.kv.mod_revision] = t
            for ev, parsed, value in changes:
                if ev.kind == "delete" and parsed.kind == "join" and \
                        (ev.kv.mod_revision, parsed.node) in moved:
                    known.discard(ev.key)
                    continue
                entry = describe(parsed.kind, parsed, value, ev.key in known)
                (known.add if ev.kind == "put" else known.discard)(ev.key)
                if entry is not None:
                    # a value without a time of its own (a plan, the budget), or a delete, written in the same
                    # revision as one that has it has that time; else none ("-": etcd keeps no time per revision)
                    entry.update(revision=ev.kv.mod_revision,
                                 time=_time_of(value, ev.kv.version == 1) or times.get(ev.kv.mod_revision))
                    extra = steps.take(value, entry) if parsed.kind == "progress" else None
                    emit(entry)
                    count += 1
                    if extra is not None:
                        emit(extra)
                        count += 1
                    ended = ended or entry["event"] == "result"
            if follow and ended:
                break
    finally:
        watch.cancel()
    return count


class Steps:
    """The nodes' latest progress as the replay meets it: each progress entry gets the job's step and rate
    (``coord.progress.summarize``), and a change in who straggles is an entry of its own."""

    def __init__(self, threshold: float):
        self.threshold, self.latest, self.named = threshold, {}, ()

    def take(self, value: Progress, entry: dict) -> dict | None:
        self.latest[value.node] = value
        job = summarize(self.latest.values(), None, self.threshold)
        entry["job"] = job.describe() if job else "-"
        named = job.stragglers if job else ()
        if {n for n, _ in named} == {n for n, _ in self.named}:
            return None
        self.named = named
        return {"event": "stragglers", "round": job.round, "nodes": dict(named), "median": job.rate,
                "threshold": self.threshold, "revision": entry["revision"], "time": entry["time"]}


PROGRESS_PROBE = 0.2  # seconds between the replay's progress requests: how long it waits at the end


def run_events(ns, etcd: Etcd) -> int:
    """``etcd-agent events --run-id JOB [--follow] [--json | --plot FILE]`` (``--plot``: ``timeline``)."""
    if ns.plot:
        from .timeline import plot

        return plot(ns, etcd)

    def emit(entry: dict) -> None:
        # allow_nan=False: JSON has no Infinity or NaN (the records refuse them when they read a value)
        print(json.dumps(entry, sort_keys=True, allow_nan=False) if ns.json else line(entry), flush=True)
    if not ns.json:
        print(HEADER, flush=True)
    replay(etcd, RunKeys(ns.root, ns.run_id), ns.follow, emit)
    return 0
