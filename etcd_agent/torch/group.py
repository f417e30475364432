"""The agent's "worker group" under torchrun's ``etcd-v3`` backend: torch's agent and the workers it runs, as one
``workers.WorkerGroup`` stand-in that hands each round to the rendezvous handler (``rendezvous.py``).

Imports no torch itself; only ``etcd_agent.torch.rendezvous`` imports this module.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

from ..schema.values import Failure
from ..node.api import Assignment, WorkerExit

if TYPE_CHECKING:
    from .rendezvous import EtcdV3RendezvousHandler


class TorchrunWorkers:
    """The agent's "worker group" for one round: torch's agent and the workers it runs. ``start`` hands the round
    to ``next_rendezvous``; ``stop`` asks torch's agent to stop its workers (``num_nodes_waiting``) and waits
    until it came back for the next round, or kills the workers itself when that takes too long."""

    def __init__(self, handler: "EtcdV3RendezvousHandler", on_exit, node_id: str):
        self.handler = handler
        self.on_exit = on_exit
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

    def failure_report(self, ex: WorkerExit) -> Failure:
        return self.handler._failure_report(ex)

    def ended_on_its_own(self, ex: WorkerExit) -> bool:
        return False

    def silent_for(self) -> list:
        return []

    # --- called by the handler ---
    def report(self, ok: bool) -> None:
        """torch's agent says how this round's workers ended here: all succeeded, or the group failed."""
        if self.ended:
            return
        self.ended = True
        self.on_exit(WorkerExit(local_rank=0, rank=-1, pid=0, returncode=0 if ok else 1, time=time.time(),
                                round=self.round))
