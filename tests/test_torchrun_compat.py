"""etcd-agent as a drop-in torchrun, measured on real command lines (tests/compat/catalog.py).

Each line runs under real torchrun 2.13 (``python -m torch.distributed.run``) and under etcd-agent
(``python -m etcd_agent``, the same arguments; ``--etcd-endpoints`` of the session etcd added for a multi-node line,
nothing for a one-node line), with the recording worker as the training script, and the two are compared: exit
status, worker count and ranks per node, each worker's interpreter, command line, sys.argv, working directory and
environment (minus the documented legitimate differences, see tests/compat/runner.py), and where each worker's
stdout and stderr went. Multi-node lines start two launcher processes on 127.0.0.1.

The table of results goes to ``<pytest tmp>/compat*/compat_table.{json,md}`` and is printed at the end (``-s``);
``tools/compat_table.py`` prints the same table outside pytest.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.torch
run_module = pytest.importorskip("torch.distributed.run")

from compat import catalog, runner  # noqa: E402

ROWS: list[dict] = []
MULTINODE = [line for line in catalog.CATALOG if line.multinode]


@pytest.fixture(scope="module")
def compat_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compat")


@pytest.fixture(scope="module")
def wrapper(compat_dir):
    return runner.make_wrapper(compat_dir / "bin")


@pytest.fixture(scope="module", autouse=True)
def table(compat_dir):
    yield
    if not ROWS:
        return
    order = {line.label: i for i, line in enumerate(catalog.CATALOG)}
    rows = sorted(ROWS, key=lambda r: order.get(r["label"], 1 << 20))
    (compat_dir / "compat_table.json").write_text(json.dumps(rows, indent=2))
    text = runner.markdown(rows)
    (compat_dir / "compat_table.md").write_text(text + "\n")
    print(f"\n\ntorchrun compatibility ({compat_dir / 'compat_table.md'}):\n{text}\n")


def _rdzv_id(line: catalog.Line) -> str:
    names = {"script": "train.py", "module": "m", "exe": "x", "head": "127.0.0.1", "port": "1", "node_rank": "0",
             "log_dir": "/tmp"}
    env, args = runner.split_line(runner.expand(line.cmd, names))
    ns = run_module.get_args_parser().parse_args(args)
    return env.get("PET_RDZV_ID", ns.rdzv_id)


def test_multinode_lines_have_distinct_job_ids():
    """The multi-node lines share the session etcd: two with one job id would see each other's job."""
    ids = [_rdzv_id(line) for line in MULTINODE]
    assert len(set(ids)) == len(ids), ids


@pytest.mark.parametrize("line", catalog.CATALOG, ids=[line.label for line in catalog.CATALOG])
def test_line_runs_as_under_torchrun(line, compat_dir, wrapper, request):
    endpoint = request.getfixturevalue("etcd_endpoint") if line.multinode else None
    ref, got = runner.run_pair(line, compat_dir / line.label, wrapper, etcd_endpoint=endpoint)
    assert ref.status == line.expect, \
        f"the catalog or the harness is wrong: torchrun {ref.status}, expected {line.expect}\n{ref.summary()}"
    diffs = runner.compare(line, ref, got)
    ROWS.append(runner.row(line, ref, got, diffs))
    assert not diffs, "etcd-agent differs from torchrun:\n  " + "\n  ".join(diffs) + "\n" + got.summary()


@pytest.mark.parametrize("line", MULTINODE, ids=[line.label for line in MULTINODE])
def test_multinode_line_without_etcd_is_refused(line, compat_dir, wrapper):
    """A multi-node torchrun line as written (no etcd endpoint) is refused at once, with one line saying what to add."""
    got = runner.run(line, "etcd-agent", compat_dir / line.label / "no-etcd", wrapper, add_endpoint=False, nodes=1,
                     timeout=90)
    assert got.status == "refused", got.summary()  # it exited with a usage error: not a timeout (a hang guard)
    assert not got.records, "workers started without an etcd"
    stderr = got.nodes[0].stderr
    errors = [x for x in stderr.splitlines() if "error" in x.lower()]
    assert len(errors) == 1 and "--etcd-endpoints" in errors[0], \
        f"expected one error line naming --etcd-endpoints:\n{stderr}"
    assert "Traceback" not in stderr
