"""What the command line says about itself: the usage line, the description, the subcommands' list (``--help``)
and the one-line error for an argument no parser knows ("did you mean").

Imports only the standard library; ``flags`` builds the parsers with it.
"""

from __future__ import annotations

import argparse
import difflib
import textwrap


def unrecognized(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """``unrecognized argument --nproc-per-nodes; did you mean --nproc-per-node?``: each argument the parser does
    not know, with the closest flag it does know when one is close."""
    known = [s for action in parser._actions for s in action.option_strings]  # noqa: SLF001 - no public list
    said = []
    for arg in unknown:
        name = arg.split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=1) if name.startswith("-") else []
        said.append((arg, close[0] if close else None))
    listed = f"`{parser.prog} --help` lists every flag"
    if len(said) == 1:
        arg, close = said[0]
        return f"unrecognized argument {arg}; " + (f"did you mean {close}?" if close else listed)
    return "unrecognized arguments " + ", ".join(arg + (f" (did you mean {close}?)" if close else "")
                                                 for arg, close in said) + f"; {listed}"


USAGE = ("%(prog)s [flags] training_script [training script args ...]\n"
         "       %(prog)s {status,stop,events,exporter,quarantine,doctor} [flags] (each has --help)")
DESCRIPTION = textwrap.fill("Elastic launcher for multi-node PyTorch jobs, coordinated through etcd v3; takes "
                            "torchrun's command line. Arguments after training_script are the script's own.", 100)
EPILOG = """subcommands:
  etcd-agent status --run-id ID --etcd-endpoints HOST:PORT [--json]
      a job's state; without --run-id, every run under --etcd-prefix
  etcd-agent stop --run-id ID --etcd-endpoints HOST:PORT [--reason TEXT]
      end a job: every agent of it stops its workers and exits
  etcd-agent events --run-id ID --etcd-endpoints HOST:PORT [--follow] [--json | --plot FILE]
      a job's history, replayed from etcd's revisions (--follow: then live)
  etcd-agent exporter --etcd-endpoints HOST:PORT [--listen HOST:PORT] [--run-id ID,...]
      the runs' state as Prometheus metrics on http://HOST:PORT/metrics
  etcd-agent quarantine list|add|release [NODE] --etcd-endpoints HOST:PORT [--for SECONDS] [--reason TEXT]
      the cluster-wide quarantine records every job honours: list them, quarantine a node, release one
  etcd-agent doctor [this launch's flags] training_script [args ...]
      check this node before a launch: what it would use, one line per check; starts nothing"""
SUBCOMMANDS = {  # name -> description (``etcd-agent NAME --help``); doctor takes a launch's flags (cli.doctor)
    "status": "Show a job's state (without --run-id: list the runs under the root).",
    "stop": "Stop a running job: every agent of it stops its workers and exits.",
    "events": "Replay a job's history from etcd's revisions (--follow: then every change as it happens).",
    "exporter": "Serve the state of the runs under the root as Prometheus metrics (needs the metrics extra).",
    "quarantine": "List, add or release cluster-wide quarantine records: every job on this etcd skips the node.",
}
