"""deploy/slurm.sbatch with a hot spare (SPARES=1) on the 3-node bed: node1 and node2 train (NNODES 2:2), node3
(the last task by SLURM_PROCID) starts with --spare and waits. A crash of node2 (every process of it, slurmd
included): the next round closes as soon as its lease ends, with node3 in node2's group rank (whichever that
was: ranks follow the join order) and node1 keeping its own; the job then finishes succeeded, and history.check holds.
"""

from __future__ import annotations

import time

import pytest

from . import history
from .slurm import NPROC, LongJob, status

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

LEASE_TTL_S = 5.0  # the agent's default --lease-ttl
NOTICE_S = LEASE_TTL_S + 5.0
WORLD = 2 * NPROC  # two regular nodes


@pytest.fixture
def node2_crashable(healthy):
    """The bed, given back with node2 restarted and idle after the test."""
    yield healthy
    if healthy.slurmd["node2"].poll() is not None:
        healthy.start_slurmd("node2")
    healthy.wait_nodes("IDLE", timeout=60)


def test_spare_takes_the_lost_rank(node2_crashable, tmp_path):
    bed, victim = node2_crashable, "node2"
    with LongJob(bed, tmp_path, SPARES="1") as job:
        found = history.wait_round(job.out, 1, WORLD, timeout=60)
        first = history.of_round(found, 1)
        hosts = [first[r]["host"] for r in range(WORLD)]  # group ranks in join order
        assert sorted(hosts) == ["node1"] * NPROC + ["node2"] * NPROC, first
        state = status(bed, job.run_id)
        assert (state["spec"]["min_nodes"], state["spec"]["max_nodes"]) == (2, 2), state["spec"]
        assert "node3" in state["nodes"], state["nodes"]  # registered, waiting as a spare
        crashed = time.time()
        bed.crash(victim)
        found = history.wait_round(job.out, 2, WORLD, timeout=30)
        second = history.of_round(found, 2)
        running = min(r["start"] for r in second.values()) - crashed
        end = job.finish()
    assert end["JobState"] == "COMPLETED", f"{end}\n{job.output()}"
    assert [second[r]["host"] for r in range(WORLD)] == [h.replace(victim, "node3") for h in hosts], second
    assert all(second[r]["env"]["GROUP_RANK"] == first[r]["env"]["GROUP_RANK"] for r in range(WORLD))
    assert not any(n == 1 and r["host"] == "node3" for (n, _), r in history.records(job.out).items())
    s = history.check(bed, job.run_id, job.out)
    assert s.restarts == 1 and s.rounds[2].counted and len(s.rounds) == 2, s.describe()
    print(f"node2 crashed: round 2 opened {s.rounds[2].opened - crashed:.1f} s after, the spare node3 running in "
          f"node2's group rank {running:.1f} s after; {s.describe()}")
