"""What this node's workers get for a round and how one of them ended: the records the worker groups and their users
share (``node.workers.WorkerGroup``, ``torch.group``, ``testing.sim``, the agent).

Pure data: imports ``proctree`` only; never ``etcd/``, ``coord/`` or the agent.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import proctree


@dataclass(frozen=True)
class Assignment:
    """What this node's workers get for one round."""

    run_id: str
    round: int
    group_rank: int
    group_world_size: int
    rank_offset: int  # global rank of local_rank 0
    world_size: int
    master_addr: str
    master_port: int
    restart_count: int  # job-wide, the same on every node
    max_restarts: int
    job: int = 1  # which job of the run (a re-run of a finished run id is the next one): its own log tree


@dataclass(frozen=True)
class WorkerExit:
    """One worker's end; ``returncode`` < 0 means killed by signal ``-returncode``."""

    local_rank: int
    rank: int
    pid: int
    returncode: int
    time: float  # wall clock when the exit was seen
    round: int

    @property
    def failed(self) -> bool:
        return self.returncode != 0

    @property
    def signal_name(self) -> str | None:
        return proctree.signal_name(-self.returncode) if self.returncode < 0 else None

    def describe(self) -> str:
        """``exit code 3`` or ``signal SIGSEGV``."""
        return proctree.describe_exit(self.returncode)
