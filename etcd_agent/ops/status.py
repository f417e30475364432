"""``etcd-agent status`` and ``etcd-agent stop``: read or end a job through the same key schema and txns.

``status`` reads the run prefix once and prints the run's current job, whether and how it ended, and the outcome of
every earlier job of the run (or ``--json``); ``stop`` ends the current job ``stopped`` with one guarded txn, and
every agent of the job reacts through its watch. Neither touches a job's data otherwise.

Imports the base modules, ``schema/``, ``etcd.client``, ``coord/`` (mirror, txns, blame, abandon), ``ops.events`` and
``ops.exporter``; never ``node/``, the agent or ``torch/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

from ..coord import abandon, blame, txns
from ..coord.progress import JobProgress, summarize
from ..config import NO_RESTART_LIMIT, TORCHRUN_NPROC, EtcdConfig
from ..errors import BadKeyData, ConfigError, EtcdAuthError, EtcdUnavailable
from ..etcd.client import Etcd, op_count, op_get, prefix_end
from ..schema.keys import RunKeys
from ..coord.mirror import Mirror
from ..schema.values import Failure, NodeInfo, Phase, Progress, Quarantine, Result, RoundInfo, SpecValue


def run_subcommand(name: str, ns: argparse.Namespace, cfg: EtcdConfig, flag: str) -> int:
    """``status``, ``stop``, ``events`` or ``exporter`` with its parsed flags (``cli.flags.subcommand_parser``),
    against the etcd of ``cfg``; ``flag`` says where its endpoints came from."""
    return with_etcd(cfg, flag, lambda etcd: _subcommand(name, ns, etcd))


def with_etcd(cfg: EtcdConfig, flag: str, command: Callable[[Etcd], int]) -> int:
    """``command`` run with a client of the etcd of ``cfg``, closed after it; an unreachable etcd (nothing was shown
    or changed) is a usage problem that says where we looked: ``flag`` and its endpoints."""
    etcd = Etcd(cfg)
    try:
        return command(etcd)
    except EtcdUnavailable as exc:
        raise ConfigError(f"{flag} {etcd.endpoints_text}: {exc}") from exc
    finally:
        etcd.close()


def _subcommand(name: str, ns: argparse.Namespace, etcd: Etcd) -> int:
    if name == "events":
        from .events import run_events

        return run_events(ns, etcd)
    if name == "exporter":
        from .exporter import run_exporter

        return run_exporter(ns, etcd)
    if not ns.run_id:
        runs = list_all_runs(etcd, ns.root)
        print(json.dumps(runs, indent=2, sort_keys=True) if ns.json else describe_runs(ns.root, runs))
        return 0
    return _run(name, ns, RunKeys(ns.root, ns.run_id), etcd)


def _run(name: str, ns: argparse.Namespace, run: RunKeys, etcd: Etcd) -> int:
    no_job = ConfigError(f"--run-id {ns.run_id}: no job under {run.prefix} at {etcd.endpoints_text}")
    if name == "stop":
        keys = txns.current_job(etcd, run)
        if keys is None:
            raise no_job
        if txns.stop_job(etcd, keys, ns.reason, time.time()):
            print(f"job {ns.run_id} (job {keys.gen} of the run) stopped: every agent stops its workers and exits")
            return 0
        print(f"job {ns.run_id} (job {keys.gen} of the run) had already ended; nothing changed")
        return 1
    kvs, rev = etcd.get_prefix(run.prefix)
    state = run_snapshot(run, kvs, rev)
    if state is None:
        raise no_job
    if not state["ended"] and not state["nodes"] and _ended_abandoned(etcd, run):
        kvs, rev = etcd.get_prefix(run.prefix)
        state = run_snapshot(run, kvs, rev)
    state["rounds"] = round_times(etcd, run)
    # allow_nan=False: JSON has no Infinity or NaN (the records refuse them when they read a value)
    print(json.dumps(state, indent=2, sort_keys=True, allow_nan=False) if ns.json else describe(ns.run_id, state))
    return 0


def _ended_abandoned(etcd: Etcd, run: RunKeys) -> bool:
    """The run's current job has no result and no live node: end it as abandoned unless an agent registers within
    ``abandon.ABANDONED_GRACE`` seconds (said on stderr, so that a --json answer stays JSON)."""
    keys = txns.current_job(etcd, run)
    say = lambda fmt, *args: print(fmt % args, file=sys.stderr, flush=True)  # noqa: E731
    if keys is None or not abandon.end_if_abandoned(etcd, keys, abandon.ABANDONED_GRACE, say):
        return False
    say("job %s (job %d of the run) had no node left: it is ended now (stopped, abandoned)", run.run_id, keys.gen)
    return True


def round_times(etcd: Etcd, run: RunKeys) -> list[dict]:
    """When each round of the current job opened, closed (its plan written) and ended (the next round opened, or the
    job ended), and how long it took to form and ran; from the job's history (``events``), as far as etcd still
    keeps it."""
    from .events import replay

    rounds: dict[int, dict] = {}
    last: dict | None = None

    def take(entry: dict) -> None:
        nonlocal last
        e, t = entry["event"], entry.get("time")
        if e == "round opened":
            if last is not None and last.get("ended") is None:
                last["ended"] = t
            last = rounds.setdefault(entry["round"], {"round": entry["round"], "opened": t, "closed": None,
                                                      "ended": None, "why": entry.get("reason")})
        elif e == "round closed" and entry["round"] in rounds:
            rounds[entry["round"]]["closed"] = t
        elif e in ("job ended", "result") and last is not None and last.get("ended") is None:
            last["ended"] = t

    replay(etcd, run, False, take)
    out = []
    for r in sorted(rounds.values(), key=lambda r: r["round"]):
        formed = r["closed"] - r["opened"] if r["closed"] and r["opened"] else None
        ran = r["ended"] - r["closed"] if r["ended"] and r["closed"] else None
        out.append({**r, "formed_s": formed, "ran_s": ran})
    return out


def list_all_runs(etcd: Etcd, root: str) -> list[dict]:
    """``list_runs``; an etcd user that may not read all of ``root`` (a per-job user) is told to give --run-id."""
    try:
        return list_runs(etcd, root)
    except EtcdAuthError as exc:
        if "permission denied" not in str(exc):
            raise
        raise EtcdAuthError(f"{exc}: without --run-id, status lists every run under {root}/, which this etcd user "
                            f"may not read (a per-job user may read only its own run's keys, {root}/RUN_ID/): give "
                            "--run-id RUN_ID") from exc


RUNS_PER_TXN = 40  # three reads per run; etcd allows 128 operations per txn


def list_runs(etcd: Etcd, root: str) -> list[dict]:
    """Every run under ``root`` (a ``<root>/<run>/job`` pointer) with its current job: generation, phase, round,
    live nodes and result. One keys-only read of the root, then a few reads per run in batched txns."""
    prefix = root + "/"
    pointers = [k for k in etcd.keys_in_range(prefix, prefix_end(prefix))
                if k.endswith("/job") and k[len(prefix):].count("/") == 1]
    runs = []
    for start in range(0, len(pointers), RUNS_PER_TXN):
        batch = pointers[start:start + RUNS_PER_TXN]
        res = etcd.txn([], [op_get(k) for k in batch], where="read the runs' pointers")
        jobs = []
        for key, kvs in zip(batch, res.ranges):
            run = RunKeys(root, key[len(prefix):-len("/job")])
            try:
                jobs.append((run, run.generation(txns.pointer_generation(kvs[0])) if kvs else None))
            except BadKeyData as exc:
                runs.append({"run_id": run.run_id, "error": str(exc)})
        ops = []
        for _run, keys in jobs:
            if keys is not None:
                ops += [op_get(keys.round()), op_get(keys.result()), op_count(keys.nodes())]
        res = etcd.txn([], ops, where="read the runs' jobs") if ops else None
        answers = iter(zip(res.ranges, res.counts) if res else ())
        for run, keys in jobs:
            if keys is None:
                continue
            (rnd, _), (result, _), (_, nodes) = next(answers), next(answers), next(answers)
            entry = {"run_id": run.run_id, "job": keys.gen, "nodes_alive": nodes}
            try:
                r = RoundInfo.from_kv(rnd[0]) if rnd else None
                done = Result.from_kv(result[0]) if result else None
            except BadKeyData as exc:
                entry["error"] = str(exc)
            else:
                entry.update(phase=r and r.phase, round=r and r.number,
                             result=done and {"outcome": done.outcome, "reason": done.reason})
            runs.append(entry)
    return sorted(runs, key=lambda e: e["run_id"])


def describe_runs(root: str, runs: list[dict]) -> str:
    if not runs:
        return f"no runs under {root}"
    lines = [f"{'RUN':30} {'JOB':>4} {'PHASE':9} {'ROUND':>5} {'NODES':>5}  RESULT"]
    for e in runs:
        if "error" in e and "phase" not in e:
            lines.append(f"{e['run_id']:30} unreadable: {e['error']}")
            continue
        res = e.get("result")
        lines.append(f"{e['run_id']:30} {e['job']:>4} {e.get('phase') or '-':9} {e.get('round') or '-':>5} "
                     f"{e['nodes_alive']:>5}  " + (f"{res['outcome']}: {res['reason']}" if res else "-"))
    return "\n".join(lines)


def run_snapshot(run: RunKeys, kvs: list, revision: int) -> dict | None:
    """The current job's snapshot plus ``generation``, ``ended`` and ``earlier`` (each earlier job's result), from
    one read of the run prefix; None when the run has no job."""
    pointer = next((kv for kv in kvs if kv.key == run.job()), None)
    gens = {g for g in map(run.generation_of, (kv.key for kv in kvs)) if g is not None}
    if pointer is None:
        if gens:
            raise BadKeyData(run.job(), f"missing, but job(s) {', '.join(map(str, sorted(gens)))} of the run exist")
        return None
    keys = run.generation(txns.pointer_generation(pointer))
    mirror = Mirror(keys)
    mirror.reset([kv for kv in kvs if kv.key.startswith(keys.prefix)], revision)
    state = snapshot(mirror)
    results = {kv.key: kv for kv in kvs}
    earlier = []
    for gen in sorted(g for g in gens if g != keys.gen):
        kv = results.get(run.generation(gen).result())
        earlier.append({"generation": gen, "result": kv and Result.from_kv(kv).to_json()})
    return {**state, "generation": keys.gen, "ended": state["result"] is not None, "earlier": earlier}


def snapshot(mirror: Mirror, now: float | None = None) -> dict:
    """The job's state as JSON (``now``: the wall time its ages are taken at). A key whose value does not fit the
    schema does not hide the rest: it is named under ``problems`` and left out (a round key that cannot be read: the
    newest round with keys is shown instead)."""
    k, problems = mirror.keys, []

    def read(make, default=None):
        try:
            return make()
        except BadKeyData as exc:
            problems.append(str(exc))
            return default

    rnd = read(mirror.round)
    number = rnd.number if rnd else k.newest_round(kv.key for kv in mirror.under(k.rounds()))
    restarts = read(mirror.restarts)
    plan = read(lambda: mirror.plan(number))
    nodes = {}
    for kv in mirror.children(k.nodes()):
        if kv.lease:  # an entry without a lease is no live agent's
            info = read(lambda: mirror.record(kv, NodeInfo))
            if info is not None:
                nodes[kv.key[len(k.nodes()):]] = info.to_json()
    result = read(lambda: mirror.record_at(k.result(), Result))
    spec = read(lambda: mirror.record_at(k.spec(), SpecValue))
    quarantined = {}
    for kv in mirror.children(k.quarantines()):
        q = read(lambda: mirror.record(kv, Quarantine))
        if q is not None and q.until:
            quarantined[kv.key[len(k.quarantines()):]] = {"until": q.until, "reason": q.reason}
    joined = sorted(kv.key[len(k.joins(number)):] for kv in mirror.children(k.joins(number)))
    steps = [p for kv in mirror.children(k.progresses()) if (p := read(lambda: mirror.record(kv, Progress)))]
    job = summarize(steps, None, spec.straggler_threshold or 0.0 if spec else 0.0)
    return {"revision": mirror.revision, "spec": spec and spec.to_json(), "nodes": nodes,
            "round": rnd and {"round": rnd.number, "phase": rnd.phase, "reason": rnd.reason},
            "restarts": restarts and {"used": restarts.used, "max": restarts.max}, "joined": joined,
            "forming": forming(rnd, spec, joined, nodes, time.time() if now is None else now),
            "plan": plan.expanded() if plan else None,
            "exited": sorted(kv.key[len(k.exits(number)):] for kv in mirror.children(k.exits(number))),
            "failures": failures(mirror, read), "causes": causes(mirror, read), "result": result and result.to_json(),
            "problems": problems,
            "quarantined": quarantined, "progress": job and {**job.to_json(), "by_node": {
                p.node: {"round": p.round, "step": p.step, "rate": p.rate, "time": p.time} for p in steps}}}


def forming(rnd: RoundInfo | None, spec: SpecValue | None, joined: list[str], nodes: dict, now: float) -> dict | None:
    """A forming round: how many joined of --nnodes MIN:MAX and how many more it needs, the registered nodes that
    have not joined, its age and the seconds until it times out: from its opening (the round key's time) plus the
    --join-timeout the job's spec records (None when the spec has none: a job an older agent started). About: the
    round's leader times it out by its own clock and --join-timeout. None when no round forms."""
    if rnd is None or rnd.phase != Phase.JOINING:
        return None
    opened = rnd.time or None
    timeout = spec.join_timeout if spec is not None and spec.join_timeout else None
    return {"round": rnd.number, "nodes_joined": len(joined), "min_nodes": spec and spec.min_nodes,
            "max_nodes": spec and spec.max_nodes, "missing": spec and max(0, spec.min_nodes - len(joined)),
            "not_joined": sorted(set(nodes) - set(joined)), "opened": opened,
            "age_s": None if opened is None else max(0.0, now - opened), "join_timeout": timeout,
            "times_out_in_s": None if opened is None or timeout is None else max(0.0, opened + timeout - now)}


def failures(mirror: Mirror, read) -> dict[str, dict[str, dict]]:
    """Every failure report of the job: round number -> node -> report."""
    out: dict[str, dict[str, dict]] = {}
    for kv in mirror.under(mirror.keys.rounds()):
        parsed = mirror.parse_key(kv)
        if parsed is not None and parsed.kind == "failure":
            report = read(lambda: mirror.record(kv, Failure))
            if report is not None:
                out.setdefault(str(parsed.round), {})[parsed.node] = report.to_json()
    return out


def causes(mirror: Mirror, read) -> dict[str, dict]:
    """Each round's cause, as ``blame.root_cause`` has it: round number -> {node, lost, why}."""
    out = {}
    for rnd, reports in failures(mirror, read).items():
        found = [Failure.from_json(f"round {rnd} failure of {node}", f) for node, f in reports.items()]
        cause = blame.root_cause(found)
        if cause is not None:
            out[rnd] = {"node": cause.node, "lost": cause.lost, "rank": cause.rank,
                        "why": blame.attribution(found) or cause.describe()}
    return out


def forming_lines(s: dict) -> list[str]:
    """Who joined the forming round of ``s`` and who has not, how many more it needs, and when it times out."""
    f = s.get("forming") or {}
    lines = [f"  joined so far: {', '.join(s['joined']) or 'none'}"]
    if f.get("min_nodes") is not None:
        span = str(f["min_nodes"]) if f["min_nodes"] == f["max_nodes"] else f"{f['min_nodes']}:{f['max_nodes']}"
        more = f"{f['missing']} more needed" if f["missing"] else "enough to close"
        lines[0] += f" ({f['nodes_joined']} of --nnodes {span}: {more})"
    if f:
        lines.append(f"  registered, not joined: {', '.join(f['not_joined']) or 'none'}")
    if f.get("times_out_in_s") is not None:
        lines.append(f"  times out in about {f['times_out_in_s']:.0f} s (--join-timeout {f['join_timeout']:g} s; "
                     f"the round opened {f['age_s']:.0f} s ago)")
    elif f.get("age_s") is not None:
        lines.append(f"  the round opened {f['age_s']:.0f} s ago (the job's spec records no --join-timeout)")
    return lines


def _at(info: dict) -> str:
    """`` at PATH`` for a registered node with a topology path (``--topology``), else ''."""
    return f" at {info['topology']}" if info.get("topology") else ""


def describe(run_id: str, s: dict) -> str:
    res = s["result"]
    lines = [f"run {run_id}, job {s['generation']} (etcd revision {s['revision']}): "
             + (f"ended, {res.get('outcome')}" if res else "running")]
    lines += [f"  unreadable: {problem}" for problem in s.get("problems", ())]
    r, rs = s["round"], s["restarts"]
    if r:
        lines.append(f"  round {r['round']}: {r['phase']} ({r['reason']})")
    if rs:
        limit = f"of {rs['max']} " if rs["max"] < NO_RESTART_LIMIT else "(no job-wide limit) "
        lines.append(f"  restarts: {rs['used']} {limit}used")
    lines.append(f"  nodes alive: {', '.join(sorted(s['nodes'])) or 'none'}")
    lines += [f"  unhealthy, not joining: {n}: {info['health']}" for n, info in sorted(s["nodes"].items())
              if info.get("health")]
    checking = [n for n, info in sorted(s["nodes"].items()) if info.get("checking") and not info.get("health")]
    if checking:
        lines.append(f"  checking its health, not joining yet: {', '.join(checking)}")
    now = time.time()
    lines += [f"  quarantine{'d' if q['until'] > now else ' over'}: {n} until "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(q['until']))} ({q['reason']})"
              for n, q in sorted(s.get("quarantined", {}).items())]
    if s.get("progress"):  # the newest round any node reported a step in (P/progress/<node>)
        job = s["progress"]
        lines.append(f"  progress, round {job['round']}: {JobProgress.from_json(job).describe()}")
    plan = s["plan"]
    torchrun = (s.get("spec") or {}).get("nproc_per_node") == TORCHRUN_NPROC  # torch's agent assigns worker ranks
    if plan:
        workers = "torchrun's agents assign the worker ranks" if torchrun else f"{plan['world_size']} worker(s)"
        lines.append(f"  plan: {plan['group_world_size']} node(s), {workers}, master "
                     f"{plan['master_addr']}:{plan['master_port']}")
        for m in plan["members"]:
            last = m["rank_offset"] + m["nproc"] - 1
            ranks = "" if torchrun else (f" rank {last}" if m["nproc"] == 1 else f" ranks {m['rank_offset']}-{last}")
            alive = "" if res else (", alive" if m["node"] in s["nodes"] else ", gone (no registration)")
            at = _at({"topology": m.get("topology")} if m.get("topology") else s["nodes"].get(m["node"], {}))
            lines.append(f"    group rank {m['group_rank']}: {m['node']} ({m['addr']}{at}){ranks}{alive}")
        waiting = [n + (" (spare)" if s["nodes"][n].get("spare") else "") + _at(s["nodes"][n])
                   for n in sorted(set(s["nodes"]) - {m["node"] for m in plan["members"]})]
        if waiting:
            lines.append(f"  waiting for the next round: {', '.join(waiting)}")
    elif r and r["phase"] == "joining":
        lines += forming_lines(s)
    for rnd, reports in sorted(s["failures"].items(), key=lambda item: int(item[0])):
        reports = {node: Failure.from_json(f"round {rnd} failure of {node}", f) for node, f in reports.items()}
        for node, f in sorted(reports.items()):
            rank = "" if f.lost else f" rank {f.rank}"
            headline = f": {f.headline}" if f.headline else ""
            step = f" at step {f.step}" if f.step is not None else ""
            lines.append(f"  failures, round {rnd}: {node}{rank} {f.how_it_ended()}{step}{headline}")
        said = blame.attribution(reports.values())
        if said:
            lines.append(f"  cause, round {rnd}: {said}")
    for r in s.get("rounds", ()):
        if r["closed"] is None:
            took = "forming" if r["ended"] is None else "never formed"
        else:
            formed = f"formed in {r['formed_s']:.2f} s" if r["formed_s"] is not None else "formed"
            took = formed + (f", ran {r['ran_s']:.1f} s" if r["ran_s"] is not None else ", running")
        lines.append(f"  history, round {r['round']}: {took} (opened: {r['why']})")
    res = s["result"]
    if res:
        lines.append(f"  result: {res.get('outcome')} in round {res.get('round')}: {res.get('reason')}")
    for e in s.get("earlier", ()):
        res = e["result"]
        lines.append(f"  earlier job {e['generation']}: " + (
            f"{res.get('outcome')} in round {res.get('round')}: {res.get('reason')}" if res else "no result"))
    return "\n".join(lines)
