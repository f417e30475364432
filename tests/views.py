"""Builders of hand-built views for decide(), observe() and wait_note() tests: a View of a round, this node's
Local, plans, join records and failure reports, with the constants they share."""

from __future__ import annotations

import dataclasses


from etcd_agent.coord.decide import LOSS_END_GRACE, Local, Params
from etcd_agent.coord.mirror import RUNNING, Scope, View
from etcd_agent.schema.values import Failure, Join, Member, NodeInfo, Plan, Restarts, RoundInfo, SpecValue

ME = "node-a"
ROUND_REV = 500
NOW = 1000.0
WALL = 1_700_000_000.0
PARAMS = Params(min_nodes=2, max_nodes=4, max_restarts=3, last_call=2.0, join_timeout=60.0, scale_settle=1.0)
LOSS_SEEN = NOW - LOSS_END_GRACE  # a loss that ends the job, first seen a grace ago: it ends now


# --- builders --------------------------------------------------------------------------------------------------

def jn(node: str, rev: int, prev_rank: int | None = None, nproc: int = 2, port: int | None = None) -> Join:
    return Join(node, rev, f"host-{node}", f"addr-{node}", port if port is not None else 29000 + rev, nproc,
                prev_rank)


def mk_plan(number: int, nodes, nproc: int = 2, restart_count: int = 0) -> Plan:
    members, offset = [], 0
    for rank, node in enumerate(nodes):
        members.append(Member(node, rank, f"host-{node}", f"addr-{node}", nproc, offset))
        offset += nproc
    return Plan(number, tuple(members), f"addr-{nodes[0]}", 29400, restart_count, PARAMS.max_restarts, ROUND_REV)


def view(number: int = 3, phase: str = RUNNING, nodes=(ME, "node-b"), joins=None, plan=None, last_plan=None,
         exits=(), failures=None, restarts=(0, 3), result=None, reason: str = "", round_present: bool = True) -> View:
    """A View of round ``number``. Running rounds default to a plan of ``nodes`` that every node has joined;
    ``joins`` takes node names (joined in the given order) or Join records."""
    if plan is None and phase == RUNNING:
        plan = mk_plan(number, list(nodes))
    if joins is None:
        joins = plan.nodes if plan is not None else ()
    records = [j if isinstance(j, Join) else jn(j, 100 + i) for i, j in enumerate(joins)]
    return View(
        revision=1000,
        spec=SpecValue(PARAMS.min_nodes, PARAMS.max_nodes, "2", PARAMS.max_restarts),
        round=RoundInfo(number, phase, reason, ROUND_REV) if round_present else None,
        nodes={n: NodeInfo(n, f"host-{n}", pid=1) for n in nodes},
        joins={j.node: j for j in records},
        plan=plan,
        last_plan=last_plan,
        exits=frozenset(exits),
        failures=dict(failures or {}),
        restarts=Restarts(restarts[0], restarts[1], 400) if restarts is not None else None,
        result=result,
    )


def me(**kwargs) -> Local:
    return Local(**(dict(node=ME, now=NOW, wall=WALL) | kwargs))


def running_here(number: int = 3, **kwargs) -> Local:
    """This node's workers run for round ``number``."""
    return me(**(dict(workers_round=number, workers_running=True) | kwargs))


def finished_here(outcome: str, failure: dict | None = None, number: int = 3, **kwargs) -> Local:
    """This node's workers of round ``number`` have an ``outcome``: after a failure the others still run (the
    agent stops them only when the round moves on); after a success all have exited."""
    return me(workers_round=number, workers_running=outcome == "failed", outcome=outcome, failure=failure, **kwargs)


def report(node: str = ME, time: float = 7.0, rank: int = 1, exitcode: int = 1) -> Failure:
    return Failure(rank, exitcode=exitcode, message="boom", time=time, node=node)


def partial(v: View, *watched: str) -> View:
    """``v`` as a non-leader's mirror shows it: only this node's keys and the ``watched`` peers' join keys."""
    keep = {ME, *watched}
    return dataclasses.replace(v, joins={n: j for n, j in v.joins.items() if n in keep},
                               nodes={n: r for n, r in v.nodes.items() if n == ME},
                               scope=Scope(False, frozenset(watched)))
