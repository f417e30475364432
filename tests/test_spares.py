"""Hot spares (--spare): planned only in place of a lost or quarantined member, the others keeping their ranks."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from agents import poll_until, until_recorded, records, start_agents, wait_all
from etcd_agent.coord.decide import Bump, ClosePlan, Params, Wait, decide
from etcd_agent.coord.ranks import rank_joiners
from etcd_agent.coord.mirror import JOINING
from etcd_agent.schema.values import NodeInfo
from views import ME, NOW, jn, me, mk_plan, running_here, view


def spare(j):
    return dataclasses.replace(j, spare=True)


def with_spares(v, *nodes):
    return dataclasses.replace(v, nodes={**v.nodes, **{n: NodeInfo(n, spare=True) for n in nodes}})


def test_a_spare_fills_a_lost_members_rank_and_the_others_keep_theirs():
    joins = [jn("a", 11, prev_rank=0), jn("c", 12, prev_rank=2), spare(jn("s", 5))]
    assert [j.node for j in rank_joiners(joins, 3, 3).members] == ["a", "s", "c"]
    # without a spare the survivors close up in their old order, as before
    assert [j.node for j in rank_joiners(joins[:2], 3, 3).members] == ["a", "c"]
    # a spare is not taken while the regular nodes fill the plan
    full = [jn("a", 11, prev_rank=0), jn("b", 13, prev_rank=1), jn("c", 12, prev_rank=2), spare(jn("s", 5))]
    assert [j.node for j in rank_joiners(full, 3, 3).members] == ["a", "b", "c"]


def test_after_a_loss_the_round_closes_at_once_with_the_spare():
    p = Params(3, 3, 3, 30.0, 60.0, 1.0)
    last = mk_plan(2, [ME, "node-b", "node-c"])
    v = with_spares(view(phase=JOINING, nodes=[ME, "node-c"], last_plan=last,
                         joins=[jn(ME, 11, prev_rank=0), jn("node-c", 12, prev_rank=2), spare(jn("node-s", 13))]),
                    "node-s")
    action = decide(v, me(round_seen_at=NOW, min_reached_at=NOW), p)
    assert isinstance(action, ClosePlan) and action.plan.nodes == [ME, "node-s", "node-c"]


def test_the_first_round_does_not_close_early_or_take_the_spare_while_regular_nodes_may_come():
    p = Params(2, 3, 3, 30.0, 60.0, 1.0)
    v = with_spares(view(phase=JOINING, nodes=[ME, "node-b"], joins=[jn(ME, 11), jn("node-b", 12),
                                                                     spare(jn("node-s", 13))]), "node-s")
    waiting = decide(v, me(round_seen_at=NOW, min_reached_at=NOW), p)
    assert isinstance(waiting, Wait) and "last call" in waiting.why  # 3 joins, but only 2 regular of MAX 3
    closing = decide(v, me(now=NOW + 30, round_seen_at=NOW, min_reached_at=NOW), p)
    assert isinstance(closing, ClosePlan) and closing.plan.nodes == [ME, "node-b"]


def test_a_spare_does_not_scale_a_running_job_up():
    v = view(nodes=[ME, "node-b", "node-s"], plan=mk_plan(3, [ME, "node-b"]))
    later = running_here(now=NOW + 10, newcomers_since=NOW)
    assert isinstance(decide(v, later, Params(2, 4, 3, 2.0, 60.0, 1.0)), Bump)
    assert isinstance(decide(with_spares(v, "node-s"), later, Params(2, 4, 3, 2.0, 60.0, 1.0)), Wait)


def node_of(record: dict) -> str:
    """The node a worker ran on, from its error file's path (LOG_DIR/RUN/job_K/NODE/round_R/...)."""
    return record["env"]["TORCHELASTIC_ERROR_FILE"].split("/job_0001/")[1].split("/")[0]


@pytest.mark.chaos
def test_a_spare_replaces_a_sigkilled_node_at_its_rank(etcd_endpoint, run_id, tmp_path):
    """nnodes 3:3 plus one --spare: the spare sits out round 1; node-1 is SIGKILLed; round 2 runs at once with
    the spare as group rank 1 and node-0 and node-2 keeping ranks 0 and 2."""
    release = tmp_path / "release"
    members, out = start_agents(3, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                                nnodes="3:3", extra=["--max-restarts", "3"])
    until_recorded(out, lambda r: len([k for k in r if k[0] == 1]) == 3, "round 1 on the three members", timeout=60)
    spares, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                             nnodes="3:3", first=3, extra=["--max-restarts", "3", "--spare"])
    first = {rank: node_of(r) for (rnd, rank), r in records(out).items() if rnd == 1}
    assert sorted(first.values()) == ["node-0", "node-1", "node-2"]
    victim = next(a for a in members if a.node == first[1])
    poll_until(lambda: "waiting to be taken into the next round" in spares[0].stderr(), 30, "the spare waiting")
    shown = subprocess.run([sys.executable, "-m", "etcd_agent", "status", "--etcd-endpoints", etcd_endpoint,
                            "--run-id", run_id], capture_output=True, text=True, timeout=120).stdout
    assert "waiting for the next round: node-3 (spare)" in shown, shown
    victim.kill()
    until_recorded(out, lambda r: len([k for k in r if k[0] == 2]) == 3, "round 2 with the spare", timeout=60)
    second = {rank: node_of(r) for (rnd, rank), r in records(out).items() if rnd == 2}
    assert second == {0: first[0], 1: "node-3", 2: first[2]}
    release.touch()
    rest = [a for a in members if a is not victim] + spares
    assert wait_all(rest) == [0, 0, 0], [a.stderr()[-2000:] for a in rest]


def test_a_node_beyond_max_takes_a_lost_members_rank_as_a_spare_does():
    """--nnodes 2 and a third agent without --spare: after the loss of group rank 0 the third node takes rank 0 and
    the survivor keeps rank 1 (the README: a node beyond MAX is a spare)."""
    p = Params(2, 2, 3, 30.0, 60.0, 1.0)
    last = mk_plan(2, [ME, "node-b"])
    v = view(phase=JOINING, nodes=["node-b", "node-c"], last_plan=last,
             joins=[jn("node-b", 11, prev_rank=1), jn("node-c", 12)])
    action = decide(v, me(node="node-b", round_seen_at=NOW, min_reached_at=NOW), p)
    assert isinstance(action, ClosePlan) and action.plan.nodes == ["node-c", "node-b"]
    # a job below MAX takes a newcomer as a newcomer: members close up in their order, it follows
    below = dataclasses.replace(p, max_nodes=3)
    last3 = mk_plan(2, [ME, "node-b"])
    v3 = view(phase=JOINING, nodes=["node-b", "node-c"], last_plan=last3,
              joins=[jn("node-b", 11, prev_rank=1), jn("node-c", 12)])
    action = decide(v3, me(node="node-b", round_seen_at=NOW, min_reached_at=NOW), below)
    assert isinstance(action, ClosePlan) and action.plan.nodes == ["node-b", "node-c"]


@pytest.mark.chaos
def test_a_node_beyond_max_replaces_a_sigkilled_node_at_its_rank(etcd_endpoint, run_id, tmp_path):
    """--nnodes 2 and a third agent with the same flags (no --spare): it waits out round 1; the group-rank-0
    member is SIGKILLed; round 2 runs with the third node as group rank 0 and the survivor keeping rank 1."""
    release = tmp_path / "release"
    members, out = start_agents(2, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                                nnodes="2", extra=["--max-restarts", "3"])
    until_recorded(out, lambda r: len([k for k in r if k[0] == 1]) == 2, "round 1 on the two members", timeout=60)
    extra, _ = start_agents(1, etcd_endpoint, run_id, tmp_path, ["--run-until", str(release)], nproc=1,
                            nnodes="2", first=2, extra=["--max-restarts", "3"])
    first = {rank: node_of(r) for (rnd, rank), r in records(out).items() if rnd == 1}
    assert sorted(first.values()) == ["node-0", "node-1"]
    poll_until(lambda: "waiting to be taken into the next round" in extra[0].stderr(), 30, "the third node waiting")
    victim = next(a for a in members if a.node == first[0])
    victim.kill()
    until_recorded(out, lambda r: len([k for k in r if k[0] == 2]) == 2, "round 2 with the third node", timeout=60)
    second = {rank: node_of(r) for (rnd, rank), r in records(out).items() if rnd == 2}
    assert second == {0: "node-2", 1: first[1]}
    release.touch()
    rest = [a for a in members if a is not victim] + extra
    assert wait_all(rest) == [0, 0], [a.stderr()[-2000:] for a in rest]
