#!/usr/bin/env python3
"""Run the torchrun compatibility catalog (tests/compat/catalog.py) and print the markdown table.

Every line runs under real torchrun (``python -m torch.distributed.run``) and under etcd-agent (``python -m
etcd_agent``), with the recording worker as the training script; the comparison is the one
``tests/test_torchrun_compat.py`` asserts. Multi-node static lines use a private etcd this tool starts on loopback;
multi-node c10d lines run as written (one of their launchers serves etcd at the line's endpoint).

    .venv/bin/python tools/compat_table.py                  # every line
    .venv/bin/python tools/compat_table.py -k nanogpt -k tee  # lines whose label contains any of these
    .venv/bin/python tools/compat_table.py --json out.json  # also the full rows (every difference)

Exit status: 0 when every line behaves as under torchrun, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from compat import catalog, runner  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-k", dest="only", action="append", default=[], help="run lines whose label contains this")
    p.add_argument("--json", help="write the rows, with every difference, to this file")
    p.add_argument("--keep", action="store_true", help="keep the run directories (records, logs, console output)")
    args = p.parse_args(argv)
    lines = [x for x in catalog.CATALOG if not args.only or any(k in x.label for k in args.only)]
    if not lines:
        p.error("no catalog line matches")
    work = Path(tempfile.mkdtemp(prefix="compat-table-"))
    wrapper = runner.make_wrapper(work / "bin")
    server = None
    rows = []
    try:
        if any(x.multinode for x in lines):
            from etcd_agent.etcd.server import EtcdServer

            server = EtcdServer(name="compat-table").start()
        for x in lines:
            started = time.monotonic()
            ref, got = runner.run_pair(x, work / x.label, wrapper, server.endpoint if x.multinode else None)
            diffs = runner.compare(x, ref, got)
            if ref.status != x.expect:
                diffs.insert(0, f"harness: torchrun {ref.status}, the catalog expects {x.expect}")
            rows.append(runner.row(x, ref, got, diffs))
            print(f"{x.label}: torchrun {ref.status}, etcd-agent {'differs' if diffs else got.status} "
                  f"({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"run directories kept in {work}", file=sys.stderr)
    print(runner.markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if any(r["differences"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
