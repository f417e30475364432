"""Network faults under Slurm, made with nftables rules inside the bed's namespaces (netfault.py), while the job of
deploy/slurm.sbatch (beat_worker.py: 2 workers per node that heartbeat into their records) runs on node1..node3:

- node3 cut off from etcd: its agent fences itself (its workers end before its lease can) and node1/node2 re-form
  within the lease TTL plus a few seconds; healed, node3 rejoins with a scale-up (MIN:MAX 2:3);
- node3 cut off from its peers, not from etcd: the workers' TCP ring hangs, --worker-timeout restarts the job;
  healed, the ring runs again;
- the etcd leader cut off from the other members (its peer port): the job goes on, or restarts once;
- node3's link flapping (down 1.5 s and up 0.5 s, three times): the job goes on, or restarts once.

After each the job finishes succeeded and history.check holds (one plan per round, no worker of a round alive once
a later round's started, every restart counted once, no process left on any node). Each test prints its numbers.
"""

from __future__ import annotations

import time

import pytest

from . import history, netfault
from .bed import ETCDS, NODES, address
from .slurm import NPROC, LongJob

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

LEASE_TTL_S = 5.0  # the agent's default --lease-ttl (the recipe keeps it)
NOTICE_S = LEASE_TTL_S + 5.0  # "within the lease TTL plus a few seconds"
WORKER_TIMEOUT_S = 4  # --worker-timeout for the ring: a ring step takes 0.1 s
WORLD = NPROC * len(NODES)
FLAP_DOWN_S, FLAP_UP_S = 1.5, 0.5  # each outage shorter than the agent's fencing deadline (TTL - TTL/4)
LEADER_CUT_S = LEASE_TTL_S + 2.0  # longer than the lease TTL: keepalives must reach the new leader in time


def finish(bed, job: LongJob):
    end = job.finish()
    assert end["JobState"] == "COMPLETED", f"{end}\n{job.output()}"
    return history.check(bed, job.run_id, job.out)


def test_node_cut_off_from_etcd(healthy, tmp_path):
    bed, victim = healthy, "node3"
    with LongJob(bed, tmp_path) as job, netfault.healed(victim):
        history.wait_round(job.out, 1, WORLD, timeout=60)
        cut = time.time()
        netfault.cut(victim, addresses=tuple(address(e) for e in ETCDS))
        found = history.wait_round(job.out, 2, 2 * NPROC, timeout=30)
        survivors = min(r["start"] for r in history.of_round(found, 2).values()) - cut
        fenced = [r for r in history.of_round(found, 1).values() if r["host"] == victim]
        netfault.heal(victim)
        healed = time.time()
        found = history.wait_round(job.out, 3, WORLD, timeout=60)
        back = min(r["start"] for r in history.of_round(found, 3).values()) - healed
        s = finish(bed, job)
    r2, r3 = s.rounds[2], s.rounds[3]
    assert victim not in {m.split("-")[0] for m in r2.members} and r2.counted, s.describe()
    assert "scale-up" in r3.reason and not r3.counted and s.restarts == 1, s.describe()
    # Self-fencing: node3's workers got SIGTERM from their own agent before its lease could end (the lease's end is
    # what opened round 2), while node3 could reach no etcd member.
    assert len(fenced) == NPROC and all(r.get("how") == "SIGTERM" for r in fenced), fenced
    fenced_at = max(r["end"] for r in fenced) - cut
    assert fenced_at < r2.opened - cut, (fenced_at, r2.opened - cut)  # an order: fenced, then round 2 opened
    said = [line for line in job.output().splitlines() if victim in line and "session lost" in line]
    assert said, job.output()
    print(f"node3 cut off from etcd: its workers fenced {fenced_at:.1f} s after the cut, round 2 opened "
          f"{r2.opened - cut:.1f} s after, survivors running {survivors:.1f} s after; healed: round 3 (scale-up) "
          f"running {back:.1f} s after the heal; restarts {s.restarts}; {s.describe()}")


def test_node_cut_off_from_its_peers(healthy, tmp_path):
    bed, victim = healthy, "node3"
    peers = tuple(address(n) for n in NODES if n != victim)
    with LongJob(bed, tmp_path, "--ring", agent_args=("--worker-timeout", str(WORKER_TIMEOUT_S))) as job, \
            netfault.healed(victim):
        history.wait_round(job.out, 1, WORLD, timeout=60, steps=3)
        cut = time.time()
        netfault.cut(victim, addresses=peers)
        found = history.wait_round(job.out, 2, WORLD, timeout=30)  # node3 still reaches etcd: it joins too
        netfault.heal(victim)
        steps_at_cut = min(r["steps"] for r in history.of_round(found, 1).values())
        last = max(rnd for rnd, _ in history.records(job.out))
        found = history.wait_round(job.out, last, WORLD, timeout=30, steps=10)  # the ring runs again
        s = finish(bed, job)
    r2 = s.rounds[2]
    assert r2.counted and 1 <= s.restarts <= 2, s.describe()
    hangs = [e for e in s.history if e["event"] == "failure" and e["round"] == 1]
    assert hangs and all(e["how"] == "hung" for e in hangs), hangs
    detect = r2.opened - cut
    assert all(f"--worker-timeout {WORKER_TIMEOUT_S:g}" in e.get("message", "") for e in hangs), hangs
    print(f"node3 cut off from its peers: the ring stopped at step {steps_at_cut}; round 2 opened {detect:.1f} s "
          f"after the cut (--worker-timeout {WORKER_TIMEOUT_S}), failures {[(e['node'], e['how']) for e in hangs]}; "
          f"healed: round {last} ran the ring again; restarts {s.restarts}; {s.describe()}")


def test_etcd_leader_cut_off_from_the_other_members(healthy, tmp_path):
    bed = healthy
    with LongJob(bed, tmp_path) as job:
        history.wait_round(job.out, 1, WORLD, timeout=60)
        leader = netfault.etcd_leader()
        with netfault.healed(leader):
            netfault.cut(leader, ports=(2380,))
            time.sleep(LEADER_CUT_S)  # the fault's length
            now_leads = netfault.etcd_leader(tuple(e for e in ETCDS if e != leader))
        for member in bed.etcd:
            member.wait_ready(30)
        history.wait_running(bed, job.run_id, job.out, WORLD, timeout=30)
        s = finish(bed, job)
    assert s.restarts <= 1, s.describe()
    moved = [line for line in job.output().splitlines() if "calls go to" in line]
    print(f"etcd leader {leader} cut off from the other members for {LEADER_CUT_S:g} s ({now_leads} led "
          f"meanwhile): restarts {s.restarts}; {s.describe()}; {len(moved)} failover line(s)")


def test_flapping_link(healthy, tmp_path):
    bed, victim = healthy, "node3"
    with LongJob(bed, tmp_path) as job, netfault.healed(victim):
        history.wait_round(job.out, 1, WORLD, timeout=60)
        netfault.flap(victim, times=3, down_s=FLAP_DOWN_S, up_s=FLAP_UP_S)
        flapped = time.time()
        last = history.wait_running(bed, job.run_id, job.out, WORLD, timeout=60)
        settled = time.time() - flapped
        s = finish(bed, job)
    assert s.restarts <= 1, s.describe()
    failed = [line for line in job.output().splitlines() if victim in line and "keepalive failed" in line]
    assert failed, f"node3's agent never missed a keepalive: was the link down?\n{job.output()}"
    print(f"node3's link down {FLAP_DOWN_S:g} s, up {FLAP_UP_S:g} s, three times: {len(failed)} keepalive(s) of "
          f"node3 failed; round {last} runs on all nodes {settled:.1f} s after; restarts {s.restarts}; "
          f"{s.describe()}")
