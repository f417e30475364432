"""The cluster bed (bed.py) for the whole session: built by the first cluster test that asks for it, removed at
the session's end, after a failure, on Ctrl-C and on SIGTERM. A machine that cannot hold it (not root, no network
namespaces, Slurm or munge not installed) skips those tests with the reason."""

from __future__ import annotations

import shutil
import signal

import pytest

from . import bed as cluster_bed


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}: removing the cluster bed")


@pytest.fixture(scope="session")
def cluster(request, tmp_path_factory):
    """The bed. When a test failed, its daemons' logs (slurmctld, slurmd, munged, etcd) are kept in pytest's
    temporary directory, under cluster-bed-logs/."""
    why = cluster_bed.unusable()
    if why:
        pytest.skip(why)
    bed = cluster_bed.Bed()
    # SIGTERM (a CI job's timeout, say) unwinds like Ctrl-C, so that the bed is removed either way.
    previous = signal.signal(signal.SIGTERM, _interrupted)
    built = False
    try:
        bed.build()
        built = True
        yield bed
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # teardown takes a second: let it finish
        try:
            if not built or request.session.testsfailed:
                keep_logs(bed, tmp_path_factory.getbasetemp() / "cluster-bed-logs")
            bed.teardown()
        finally:
            signal.signal(signal.SIGTERM, previous)


def keep_logs(bed: cluster_bed.Bed, where) -> None:
    if bed.root is not None and bed.logs.is_dir():
        shutil.copytree(bed.logs, where, dirs_exist_ok=True)
        print(f"\ncluster bed: the daemons' logs are kept in {where}")


@pytest.fixture
def healthy(cluster):
    """The bed with every node idle in Slurm (a fault test before may have taken one down)."""
    cluster.wait_nodes("IDLE")
    return cluster
