"""CPU of the round leader's decision path per step and per round, without etcd.

The leader of a round sees every join, every exit and every loss, and takes a step per delivery batch: the
production ``Mirror`` is fed real-shaped KVs (N registry entries, then N join keys in batches of ``b``, the plan,
N exits in batches, a loss), and after each batch the leader does what ``Agent._step`` does per step: the view,
``observe`` and ``decide``. Reported: CPU seconds per step (mean) and per phase of the round (joins, running with
exits, a loss), for each N. Usage: ``python tools/bench/leader.py [--nodes 300,1000,2000,10000] [--batch 25]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from etcd_agent.coord.decide import ClosePlan, Local, Params, decide
from etcd_agent.coord.mirror import Mirror
from etcd_agent.coord.observe import observe
from etcd_agent.etcd.client import KV
from etcd_agent.etcd.watch import Event
from etcd_agent.schema.keys import Keys
from etcd_agent.schema.values import Join, NodeInfo, Phase, RoundInfo

K = Keys("/etcd-agent", "bench", 1)
LEASE = 7


class Feed:
    """A mirror fed events at increasing revisions, with the leader's step after each batch."""

    def __init__(self, n: int):
        self.mirror, self.rev = Mirror(K), 1
        self.params = Params(min_nodes=n, max_nodes=n, max_restarts=3, last_call=5.0, join_timeout=600.0,
                             scale_settle=5.0, lease_ttl=30.0)
        self.me = Local("node-0000", 0.0, 0.0, lease=LEASE)
        self.steps, self.cpu = 0, 0.0
        self.last = None

    def kv(self, key: str, value: bytes, lease: int = LEASE) -> KV:
        self.rev += 1
        return KV(key, value, self.rev, self.rev, 1, lease)

    def deliver(self, events: list) -> None:
        t0 = time.process_time()
        self.mirror.apply(events)
        self.step()
        self.cpu += time.process_time() - t0

    def step(self):
        v = self.mirror.view()
        self.me, _notes = observe(v, self.me, self.params, self.me.now + 0.01, self.me.wall + 0.01)
        self.last = decide(v, self.me, self.params)
        self.steps += 1
        return self.last


def node_kv(f: Feed, name: str) -> KV:
    return f.kv(K.node(name), NodeInfo(node=name, host=name, addr="10.0.0.1", pid=1, nproc=8).encode())


def round_kv(f: Feed, number: int, phase: Phase) -> KV:
    return f.kv(K.round(), RoundInfo(number=number, phase=phase, last_plan=0, nodes=None).encode(), lease=0)


def run(n: int, batch: int) -> dict:
    f = Feed(n)
    names = [f"node-{i:04d}" for i in range(n)]
    f.mirror.reset([node_kv(f, name) for name in names] + [round_kv(f, 1, Phase.JOINING)], f.rev)
    phases = {}

    def phase(name, body):
        steps, cpu = f.steps, f.cpu
        body()
        phases[name] = (f.steps - steps, f.cpu - cpu)

    def joins():
        for i in range(0, n, batch):
            f.deliver([Event("put", f.kv(K.join(1, m), Join(node=m, addr="10.0.0.1", port=29500, nproc=8).encode()))
                       for m in names[i:i + batch]])
        f.me = dataclasses.replace(f.me, now=f.me.now + 10.0)  # the last call is over
        t0 = time.process_time()
        act = f.step()
        f.cpu += time.process_time() - t0
        assert isinstance(act, ClosePlan), act
        f.plan = act.plan

    def running():
        plan = f.plan
        kvs = [f.kv(K.plan(1), plan.header(), lease=0)] + [f.kv(K.plan_part(1, p.part), p.encode(), lease=0)
                                                           for p in plan.split()]
        f.deliver([Event("put", kv) for kv in kvs] + [Event("put", round_kv(f, 1, Phase.RUNNING))])
        f.me = dataclasses.replace(f.me, workers_round=1, workers_running=True)
        for i in range(1, n, batch):  # the others' exits (the leader's own workers still run)
            f.deliver([Event("put", f.kv(K.exit(1, m), b"{}")) for m in names[i:i + batch]])

    def loss():
        f.deliver([Event("delete", KV(K.join(1, names[-1]), b"", f.rev + 1, f.rev + 1, 1, LEASE)),
                   Event("delete", KV(K.node(names[-1]), b"", f.rev + 1, f.rev + 1, 1, LEASE))])

    phase("joins", joins)
    phase("exits", running)
    phase("loss", loss)
    return {"n": n, "steps": f.steps, "cpu": f.cpu, "phases": phases}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="300,1000,2000,10000", help="comma-separated N")
    ap.add_argument("--batch", type=int, default=25, help="events per delivery (a step per delivery)")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error("--batch must be at least 1")
    print(f"{'N':>6} {'steps':>6} {'round s':>8} {'ms/step':>8}  per phase: steps, s, ms/step")
    for n in (int(x) for x in args.nodes.split(",")):
        r = run(n, args.batch)
        per = "  ".join(f"{k}: {s}, {c:.3f}, {1000 * c / max(s, 1):.2f}" for k, (s, c) in r["phases"].items())
        print(f"{n:>6} {r['steps']:>6} {r['cpu']:>8.3f} {1000 * r['cpu'] / r['steps']:>8.2f}  {per}")


if __name__ == "__main__":
    main()
