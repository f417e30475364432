"""The model of a large job, derived from measured per-operation costs (``costs.py`` measures them): pure arithmetic,
no I/O, so that ``tests/test_costs_model.py`` can check it on fixed inputs and ``docs/scale-model.md`` can quote it.

A unit cost is a dict per operation kind, each ``{"cpu", "leader", "sent", "received"}``: etcd CPU seconds summed over
the members, the leader's CPU seconds, and bytes etcd sent to and received from clients, per operation (per event
delivered for ``event``, per KB for ``read_kb``). Kinds: ``keepalive`` (one LeaseKeepAlive request on an open stream),
``txn`` (a guarded txn writing one ~200 B key), ``event`` (one watch event delivered to one watcher),
``join_fixed`` and ``join_key`` (the agent's join txn in a round that K nodes joined before costs join_fixed +
K x join_key: its range sorted by create revision reads every join key of the round), ``read_fixed`` and
``read_kb`` (a range read costs read_fixed + KB x read_kb), ``progress`` (one watch progress request and its
answer). The formulas are stated beside each function; every output is "derived".

Imports ``etcd_agent.config`` only (for today's keepalive and probe periods).
"""

from __future__ import annotations

import dataclasses

from etcd_agent.config import Timings

KINDS = ("keepalive", "txn", "join_fixed", "join_key", "event", "read_fixed", "read_kb", "progress")
PLAN_BYTES_PER_MEMBER = 30  # today's plan: about 30 B per member (30 KB at N=1000, README's scale section)
SPLIT_READ_BYTES = 64 * 70 + 500  # after the plan split: a bounded part (64 members x ~70 B) plus a header
EXIT_KV_BYTES = 140  # one exit key read back: its key (~50 B), value (~70 B) and etcd's per-key fields
LEASE_REVOKE_RATE = 1000  # etcd 3.4 lease/lessor.go: at most 1000 expired leases revoked per second


@dataclasses.dataclass(frozen=True)
class Round:
    """What one restart round asks of etcd, per member of the round, as ``scale.py`` measured it at N = 100 and 300
    (leave and lost-lease rounds): N + 4 txn RPCs (the joins, the leader's close, the bump), 2N range RPCs (the plan
    and one more read), 3.8-4.4 N watch events (tests/test_protocol_counts bounds them by 5N)."""

    txns: float = 0.0  # txn RPCs per member besides the join (a handful per round in all: close, bump, reports)
    events: float = 5.0  # watch events delivered per member (the bound; 3-5 N measured)
    small_reads: float = 1.0  # range reads other than the plan
    plan_bytes: float = PLAN_BYTES_PER_MEMBER  # bytes of plan each member reads, per member of the job (x N)
    plan_fixed: float = 0.0  # bytes of plan each member reads whatever N (the split plan's part)
    join_scan: float | None = None  # join keys each join txn's sorted range reads; None: n/2 (the k-th joiner: k)

    def plan_read(self, n: int) -> float:
        """Bytes of plan one member reads in a round of ``n`` members."""
        return self.plan_fixed + self.plan_bytes * n

    def scanned(self, n: int) -> float:
        """Join keys one join txn reads, on average, in a round of ``n`` members."""
        return n / 2 if self.join_scan is None else self.join_scan


TODAY = Round()
SPLIT = Round(plan_bytes=0.0, plan_fixed=SPLIT_READ_BYTES)
BOUNDED = Round(plan_bytes=0.0, plan_fixed=SPLIT_READ_BYTES, join_scan=16)  # and the leader found in O(1)


def today_rates(ttl: int, members: int) -> tuple[float, float]:
    """(keepalives, progress requests) per second per idle agent with today's ``Timings``: a keepalive every
    ``Timings.keepalive(members).period`` (TTL/3 with one member; with several, 1.2 s at TTL 5 and TTL/3 from TTL 7
    on), a progress request every ``watch_probe`` seconds on its one watch stream."""
    t = Timings(lease_ttl=ttl)
    return 1.0 / t.keepalive(members).period, 1.0 / t.watch_probe


def steady(unit: dict, n: int, keepalive_rate: float, progress_rate: float) -> dict:
    """The idle load of ``n`` agents, each sending ``keepalive_rate`` keepalives and ``progress_rate`` progress
    requests per second: requests/s = n x (k + p); etcd CPU (cores) = n x (k x cpu_ka + p x cpu_pr), likewise for the
    leader and for the bytes."""
    ka, pr = unit["keepalive"], unit["progress"]

    def per_s(field: str) -> float:
        return n * (keepalive_rate * ka[field] + progress_rate * pr[field])
    return {"n": n, "requests_per_agent_s": keepalive_rate + progress_rate,
            "keepalives_s": n * keepalive_rate, "progress_s": n * progress_rate,
            "requests_s": n * (keepalive_rate + progress_rate),
            "cpu_cores": per_s("cpu"), "leader_cores": per_s("leader"),
            "sent_bytes_s": per_s("sent"), "received_bytes_s": per_s("received")}


def round_load(unit: dict, n: int, shape: Round = TODAY, members: int = 1) -> dict:
    """One restart round of ``n`` members: n joins, txns = n x txns, events = n x events, reads = n x (small_reads
    + 1), KB read = n x plan_read(n) / 1024; CPU (and leader CPU, bytes) = n x (join_fixed + scanned(n) x join_key)
    + txns x txn + events x event + reads x read_fixed + KB x read_kb. ``leader_s_1core``: the leader's CPU
    seconds, the round's floor when etcd's leader has one core. ``scan_s_per_member``: n x scanned(n) x join_key /
    members, the sorted ranges' work on each member, which it does inside its one apply loop: a floor on the
    round's time whatever its cores (the member a join goes to does that join's scan, measured)."""
    txns, events = n * shape.txns, n * shape.events
    reads = n * (shape.small_reads + 1)
    kb = n * shape.plan_read(n) / 1024

    def total(field: str) -> float:
        return (n * (unit["join_fixed"][field] + shape.scanned(n) * unit["join_key"][field])
                + txns * unit["txn"][field] + events * unit["event"][field] + reads * unit["read_fixed"][field]
                + kb * unit["read_kb"][field])
    return {"n": n, "joins": n, "join_keys_scanned": n * shape.scanned(n), "txns": txns, "events": events,
            "reads": reads, "plan_read_bytes": shape.plan_read(n),
            "scan_s_per_member": n * shape.scanned(n) * unit["join_key"]["cpu"] / members,
            "read_mb": kb / 1024, "cpu_s": total("cpu"), "leader_s_1core": total("leader"),
            "sent_mb": total("sent") / 1e6, "received_mb": total("received") / 1e6}


def job_end(unit: dict, n: int) -> dict:
    """The exit barrier at the job's end: n exit txns, each reading back the exits written before it (n/2 on
    average): CPU = n x (txn + n/2 x join_key), bytes sent = n x n/2 x EXIT_KV_BYTES."""
    keys = n * n / 2
    return {"n": n, "txns": n, "keys_read": keys, "cpu_s": n * unit["txn"]["cpu"] + keys * unit["join_key"]["cpu"],
            "leader_s_1core": n * unit["txn"]["leader"] + keys * unit["join_key"]["leader"],
            "sent_mb": keys * EXIT_KV_BYTES / 1e6}


def mass_loss_s(lost: int, ttl: int) -> float:
    """Seconds until every lease of ``lost`` agents that died at once is revoked: the TTL, then etcd's revoke rate
    (LEASE_REVOKE_RATE a second): ttl + lost / 1000."""
    return ttl + lost / LEASE_REVOKE_RATE


def memory_gb(n: int, bytes_per_agent: float) -> float:
    """etcd memory for ``n`` agents' connections, leases, keys and watch streams: n x bytes_per_agent."""
    return n * bytes_per_agent / 1e9


def rounds_retained(n: int, retention_revisions: int = 100_000, writes_per_member: float = 1.0) -> float:
    """Rounds of history a revision-based compaction keeps: retention / (n x writes per member + 5)."""
    return retention_revisions / (n * writes_per_member + 5)


def derive(unit: dict, n: int = 10_000, ttls: tuple[int, ...] = (5, 10, 30), members: int = 3,
           budget: float = 1.0) -> dict:
    """The whole model for ``n`` agents: the idle load at each TTL with today's rates and with a ``budget`` of
    requests per second per agent (a keepalive every TTL/3, the rest progress requests), and a restart round with
    today's whole-plan read and with the split plan."""
    out = {"n": n, "members": members, "steady": {}, "budget": {}, "round": {}}
    for ttl in ttls:
        out["steady"][ttl] = steady(unit, n, *today_rates(ttl, members))
        ka = min(budget, 3.0 / ttl)
        out["budget"][ttl] = steady(unit, n, ka, budget - ka)
    for label, shape in (("today", TODAY), ("split", SPLIT), ("bounded", BOUNDED)):
        out["round"][label] = round_load(unit, n, shape, members)
    out["end"] = job_end(unit, n)
    return out


def _f(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def model_markdown(model: dict) -> str:
    """The derived tables of ``derive``'s output, as markdown."""
    n = model["n"]
    lines = [f"Idle load of {n:,} agents on a {model['members']}-member etcd (derived):", "",
             "| TTL | rates | req/s/agent | keepalives/s | progress/s | etcd CPU (cores, all members) | leader "
             "(cores) | sent MB/s |", "|---|---|---|---|---|---|---|---|"]
    for kind, label in (("steady", "today"), ("budget", "budget")):
        for ttl, s in model[kind].items():
            lines.append(f"| {ttl} s | {label} | {s['requests_per_agent_s']:.2f} | {_f(s['keepalives_s'])} | "
                         f"{_f(s['progress_s'])} | {s['cpu_cores']:.2f} | {s['leader_cores']:.2f} | "
                         f"{s['sent_bytes_s'] / 1e6:.2f} |")
    lines += ["", f"One restart round of {n:,} members (derived):", "",
              "| shape | join keys scanned | other txns | watch events | reads | plan bytes per member | MB read "
              "| etcd CPU s | leader CPU s | scan s per member | sent MB |", "|---" * 11 + "|"]
    for label, r in model["round"].items():
        lines.append(f"| {label} | {_f(r['join_keys_scanned'])} | {_f(r['txns'])} | {_f(r['events'])} | "
                     f"{_f(r['reads'])} | "
                     f"{_f(r['plan_read_bytes'])} | {_f(r['read_mb'])} | {r['cpu_s']:.2f} | "
                     f"{r['leader_s_1core']:.2f} | {r['scan_s_per_member']:.2f} | {_f(r['sent_mb'])} |")
    e = model["end"]
    lines += ["", f"The job's end (exit barrier, derived): {_f(e['txns'])} txns reading back {_f(e['keys_read'])} exit "
              f"keys, etcd CPU {e['cpu_s']:.2f} s (leader {e['leader_s_1core']:.2f} s), {_f(e['sent_mb'])} MB sent."]
    return "\n".join(lines) + "\n"
