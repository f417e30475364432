"""The agent's "worker group" under torchrun's ``etcd-v3`` backend: torch's agent and the workers it runs, as one
``node.api.Group`` that hands each round to the rendezvous handler (``rendezvous.py``).

Guarantees (``node.api``'s contract): the round's outcome here is posted once, as torch's agent tells it: every
worker of this node succeeded (``GroupSucceeded``), or torch's agent restarted its workers after a failure
(``GroupFailed``, a report of the group as a whole: the worker's own error is in torchrun's log). torch's agent
stops its own workers, so there are no stopped pids of the agent's to drain.

``first_failure`` turns the ``ChildFailedError`` with which torch's agent gave up into this node's root cause.

Imports ``node.api``, ``schema.values`` and ``secure``, and no torch itself; only ``etcd_agent.torch.rendezvous``
imports this module.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Callable

from ..node.api import Assignment, GroupEvent, GroupFailed, GroupSucceeded
from ..schema.values import Failure
from ..secure import redact

if TYPE_CHECKING:
    from .rendezvous import EtcdV3RendezvousHandler


class TorchrunWorkers:
    """The agent's "worker group" for one round: torch's agent and the workers it runs. ``start`` hands the round
    to ``next_rendezvous``; ``stop`` asks torch's agent to stop its workers (``num_nodes_waiting``) and waits
    until it came back for the next round, or kills the workers itself when that takes too long."""

    stopped_pids: frozenset[int] = frozenset()  # torch's agent stops (and reaps) its workers itself
    progress_files: tuple[str, ...] = ()  # torch's agent starts the workers: they get no progress file

    def __init__(self, handler: "EtcdV3RendezvousHandler", post: Callable[[GroupEvent], None], node_id: str):
        self.handler = handler
        self.post = post
        self.node_id = node_id
        self.round = 0
        self.taken = False  # torch's agent has this round (next_rendezvous returned it)
        self.stopping = False
        self.ended = False  # a success or failure of this round was reported to the agent

    # --- called by the agent ---
    def describe(self, a: Assignment) -> str:
        return f"handed group rank {a.group_rank} of {a.group_world_size} to torchrun's agent"

    def start(self, a: Assignment) -> None:
        self.round = a.round
        self.handler._deliver(self, a)

    def stop(self, reason: str = "", grace: float | None = None, sig: int = signal.SIGTERM) -> None:
        self.handler._stop_torch(self, reason, self.handler.cfg.workers.stop_timeout if grace is None else grace)

    # --- called by the handler ---
    def report(self, ok: bool) -> None:
        """torch's agent says how this round's workers ended here: all succeeded, or the group failed."""
        if self.ended:
            return
        self.ended = True
        if ok:
            self.post(GroupSucceeded(self.round))
            return
        self.post(GroupFailed(self.round, Failure(
            message="torchrun's agent restarted it after a worker failed; the worker's error is in that node's "
                    "torchrun log", time=time.time(), round=self.round, node=self.node_id)))


def first_failure(exc, rnd: int | None, node: str) -> Failure | None:
    """The first failure of torch's ``ChildFailedError`` ``exc`` as a failure report (redacted); None when it has
    no details to give."""
    try:
        rank, failure = exc.get_first_failure()
        root = Failure(rank, failure.local_rank, failure.pid, failure.exitcode if failure.exitcode >= 0 else None,
                       failure.signal_name() if failure.exitcode < 0 else None, str(failure.message),
                       str(failure.error_file or ""), "", float(failure.timestamp), rnd, node)
    except Exception:  # noqa: BLE001 - a report without details beats none
        return None
    return root.with_strings(redact)
