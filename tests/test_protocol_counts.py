"""What a round costs etcd, counted by etcd itself (its /metrics), for N in-process agents with stand-in workers.

The round protocol is O(N): only the round's leader watches the joins and the registry; every other agent watches
the job-wide keys (round, restarts, result, spec) and one peer's join key. So watch events and writes per round
grow linearly with N. The bounds below are counts, not timings: they hold on a loaded machine too. Each test has
an etcd of its own, so no other test's traffic is counted.
"""

from __future__ import annotations


import pytest

from agents import poll_until
from etcd_agent.etcd.server import EtcdServer
from etcd_agent.testing.metrics import diff, scrape

from etcd_agent.testing.sim import JobParams, SimJob

WAIT = 60.0


def settle(server: EtcdServer, quiet: float = 0.5, timeout: float = 10.0) -> dict:
    """The metrics once nothing has been written for ``quiet`` seconds (late deletes and re-reads are counted)."""
    last = [scrape(server.client_url)]

    def unchanged() -> bool:
        now = scrape(server.client_url)
        same = now["revision"] == last[0]["revision"] and now["watch_events"] == last[0]["watch_events"]
        last[0] = now
        return same
    poll_until(unchanged, timeout, "etcd's counters did not settle", interval=quiet)
    return last[0]


def measure(server: EtcdServer, run_id: str, n: int) -> dict[str, dict]:
    """First rendezvous, a worker crash (one restart), a graceful leave: etcd's counts for each."""
    nodes = [f"n{i:03d}" for i in range(n)]
    params = JobParams(server.endpoint, run_id, min_nodes=n - 1, max_nodes=n, lease_ttl=10, last_call=30.0,
                       join_timeout=120.0, max_restarts=5)
    costs = {}
    with SimJob(params) as job:
        before = scrape(server.client_url)
        job.start(nodes)
        first = job.wait_round(1, nodes, timeout=WAIT)
        after = settle(server)
        costs["first"] = diff(before, after)

        crasher = next(node for node, s in first.items() if s.group_rank == n // 2)
        before = after
        assert job.end_workers([crasher], code=1) == 1
        job.wait_round(2, nodes, timeout=WAIT)
        after = settle(server)
        costs["crash"] = diff(before, after)

        leaver = next(node for node, s in first.items() if s.group_rank == 1)
        before = after
        job.leave(leaver)
        survivors = [node for node in nodes if node != leaver]
        job.wait_round(3, survivors, timeout=WAIT)
        after = settle(server)
        costs["leave"] = diff(before, after)
    return costs


@pytest.mark.parametrize("n", [8, 24])
def test_watch_events_and_writes_per_round_are_linear_in_n(private_etcd, run_id, n):
    costs = measure(private_etcd, run_id, n)
    for what, c in costs.items():
        print(f"N={n} {what}: events {c['watch_events']:.0f} puts {c['key_puts']:.0f} "
              f"deletes {c['key_deletes']:.0f} txns {c['rpc_txn']:.0f} ranges {c['rpc_range']:.0f}")
    # A restart (bump) and the round after it (joins, close). Each member is told of the round key twice (bump,
    # close), the restarts key, and its ring predecessor's join key (the new one put, the old round's deleted); the
    # leader of every join put and deleted: at most 5 N + 2 N. Which of these a member is told of, rather than
    # reading, depends on arrival order: measured 84-143 per round at N = 24 (quiet machine and CI), on the code before
    # and after the progress, quarantine and topology work. Quadratic would be 576.
    assert costs["crash"]["watch_events"] <= 7 * n + 10, costs["crash"]
    assert costs["leave"]["watch_events"] <= 7 * n + 10, costs["leave"]
    # The first rendezvous also creates the job and registers every node. An arriving agent watches the job-wide keys
    # from the txn that found the job, so it is told of the writes after that read: the round's close, and its ring
    # predecessor's join key (replayed); the leader is told of every registration and join (2 N). At most 5 N: measured
    # 15 at N = 8 and 71 at N = 24 (from 50 to 196 at N = 24 while an agent arriving as the job was made watched the
    # registry until its maker registered). Quadratic would be 576.
    assert costs["first"]["watch_events"] <= 5 * n + 10, costs["first"]
    # An arriving agent's txns: one read (the nested-run check, the job pointer, the job-wide keys, the registry's
    # oldest entries, its cluster quarantine record), its registration, its join and its plan read (4 N); an agent
    # that found no job and lost the race to start it makes one more (the failed start, which reads the winner's job
    # for it): measured 4 N + 5..24 at N = 8 and 24, where the simulated agents all start at once (5 N + 1..5 before
    # the spec was read with the job pointer; a loser then read twice more). Range reads are the leader's alone (its
    # registry and round watches): measured 2 (2 N + 7..18 before the job-wide keys and the cluster quarantine
    # record were watched from that first read).
    assert costs["first"]["rpc_txn"] <= 5 * n + 10, costs["first"]
    assert costs["first"]["rpc_range"] <= 8, costs["first"]
    for what in ("crash", "leave"):
        assert costs[what]["key_puts"] <= 2 * n + 10, (what, costs[what])
        assert costs[what]["rpc_txn"] <= 3 * n + 10, (what, costs[what])
        # One read per member and round: its plan. The ring predecessor's join key is not read but replayed by its
        # watch from the round's opening (measured N + 2 at N = 8 and 24; it was 2 N with the read).
        assert costs[what]["rpc_range"] <= n + 5, (what, costs[what])


def test_every_member_watches_its_ring_predecessor_without_reading_it(private_etcd, run_id):
    n = 5
    nodes = [f"n{i:03d}" for i in range(n)]
    params = JobParams(private_etcd.endpoint, run_id, min_nodes=n, max_nodes=n, lease_ttl=10, last_call=30.0,
                       join_timeout=120.0, max_restarts=5)
    with SimJob(params) as job:
        job.start(nodes)
        first = job.wait_round(1, nodes, timeout=WAIT)
        by_rank = {s.group_rank: node for node, s in first.items()}
        pred = {node: by_rank[(s.group_rank - 1) % n] for node, s in first.items()}  # the ring, in rank order

        def ring_known() -> bool:  # the replay of the predecessor's key wakes the agent, which then watches it
            scopes = {node: a.coord.scope for node, a in job.agents.items()}  # read only: the agents own them
            followers = [node for node, scope in scopes.items() if not scope.full]
            return len(followers) == n - 1 and all(scopes[node].watched == {pred[node]} for node in followers)
        poll_until(ring_known, WAIT, "every member that does not lead watches its predecessor's join key")
