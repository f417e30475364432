#!/usr/bin/env python3
"""Writes docs/flags.md, the flag reference, from the parsers themselves (``etcd_agent.cli.flags``): every flag of a
launch (``build_parser``, which ``doctor`` shares) and of ``status``, ``stop`` and ``events``
(``subcommand_parser``), with its spellings, default, environment variable and help, plus the notes below for the
flags whose behaviour needs more than a help line.

Usage: .venv/bin/python tools/gen_flags_doc.py            print the page
       .venv/bin/python tools/gen_flags_doc.py --write    rewrite docs/flags.md
       .venv/bin/python tools/gen_flags_doc.py --check    exit 1 when docs/flags.md differs (tests/test_docs.py too)

The page is built with the environment's PET_* and ETCD_AGENT_* variables removed (they replace defaults when the
parser is built), so it is the same on every machine. A note for a flag the parser does not have is an error.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "flags.md"
sys.path.insert(0, str(ROOT))

from etcd_agent.cli import flags, usage  # noqa: E402 - after the path, so the checkout's package is the one described

# What a flag does under etcd-agent beyond its help line (from the launch's rules in etcd_agent/cli/launch.py and
# the agent); keyed by the flag's first long spelling.
NOTES = {
    "--nnodes": "`N` or `MIN:MAX`, as torchrun (at most 10000: a round's plan is one etcd value). At most 1 and no "
                "etcd endpoint: the embedded etcd; more with a c10d endpoint and no etcd: the etcd one agent serves "
                "there ([from-torchrun.md](from-torchrun.md#a-c10d-line-without-an-etcd)).",
    "--nproc-per-node": "`gpu` counts the visible NVIDIA GPUs without importing torch; `xpu` the Intel GPUs; `cpu` "
                        "the CPUs; `auto` the NVIDIA GPUs if there are any, else the Intel GPUs, else the CPUs. With "
                        "`gpu`, the health gate checks the GPUs through NVML "
                        "([recovery.md](recovery.md#health-gate)).",
    "--rdzv-backend": "Any value is accepted. `etcd`, `etcd-v2`, `etcd-v3`: `--rdzv-endpoint` is the etcd cluster. "
                      "`static` (the default): `--node-rank`, `--master-addr` and `--master-port` apply. `c10d`: the "
                      "rendezvous runs through etcd all the same; a multi-node line without an etcd endpoint runs on "
                      "the etcd one agent serves at `--rdzv-endpoint`. Others: as `c10d`, but a multi-node line "
                      "needs an etcd endpoint.",
    "--rdzv-endpoint": "With an etcd backend: the etcd endpoints (`HOST:PORT,...`). With another backend it is not "
                       "etcd: with `--etcd-endpoints` one log line says it is not used for coordination; without, a "
                       "multi-node c10d line's agents run on an etcd that the one able to bind `HOST[:29400]` serves "
                       "there, and other multi-node lines are refused, naming the flag to add.",
    "--rdzv-id": "The same as `--run-id`; two different values are an error. Not given: a one-node job makes a fresh "
                 "id, as torchrun; a static line uses `static-<master addr>-<master port>` (distinct per job, the "
                 "same on every node); otherwise torchrun's `none`, with a warning unless the etcd is the job's own.",
    "--rdzv-conf": "`join_timeout` and `timeout` set `--join-timeout`; `last_call_timeout` sets `--last-call`; "
                   "`keep_alive_interval` x `keep_alive_max_attempt` sets `--lease-ttl` (their product rounded up to "
                   "whole seconds, at least 2; a missing one takes torch's default, 5 s or 3; with `lease_ttl` or "
                   "`--lease-ttl` they must agree); `protocol`, `cacert`, `cert`, `key` (torch's etcd backend) set "
                   "TLS to etcd; `close_timeout`, `read_timeout`, `heartbeat_timeout`, `is_host`, `use_libuv`, "
                   "`store_type`, `rank` are accepted and not needed (logged). etcd-agent's own options may be given "
                   "too (`lease_ttl=3,worker_timeout=60`). An unknown key is a warning naming it; a bad value, a key "
                   "that contradicts a flag, or one setting given under two names with two values is an error naming "
                   "both; `etcd_password` is refused (use `--etcd-password-file`). The keys are one table with the "
                   "torchrun backend's (`etcd_agent/cli/rdzv_conf.py`, "
                   "[torchrun-backend.md](torchrun-backend.md#--rdzv-conf-keys)).",
    "--standalone": "A one-node job on the embedded etcd; `--rdzv-*` values are ignored, as under torchrun. A "
                    "one-node line needs neither this flag nor an etcd endpoint.",
    "--max-restarts": "The restart budget of the **whole job**, counted in etcd (torchrun counts per agent); "
                      "[recovery.md](recovery.md#the-restart-budget) says what spends it.",
    "--monitor-interval": "Worker exits are seen the moment they happen (a thread blocked in `waitpid` per worker), "
                          "not by polling.",
    "--start-method": "Workers are new processes, as torchrun runs scripts.",
    "--role": "Also the console prefix `[<role><local rank>]:` of `--tee`.",
    "--run-path": "torchrun runs the script with `runpy.run_path` in a spawned interpreter; here it is "
                  "`python -u SCRIPT`, with the same `sys.argv`.",
    "--log-dir": "Worker files: `<dir>/<run-id>/job_<NNNN>/<node>/round_<NNNN>/rank_<global rank>/{stdout,stderr}.log, "
                 "error.json` (torchrun: `<dir>/<id>_<random>/attempt_<N>/<local rank>/`): one tree per job, node and "
                 "round, safe on a shared file system; a re-run of a finished run id (the next job) never overwrites "
                 "the earlier one. Private (directories 0700, files 0600, all made by the agent): a symlink or "
                 "another user's entry below `<dir>` is refused, never followed "
                 "([security.md](security.md#private-log-files)).",
    "--redirects": "As torchrun: `0`-`3` (1 stdout, 2 stderr, 3 both) or per local rank (`0:3,1:1`); redirected "
                   "streams go to the log files only.",
    "--tee": "As torchrun: to the log files and the console, each line prefixed `[<role><local rank>]:` "
             "(`$TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE` works).",
    "--local-ranks-filter": "As torchrun; the hidden ranks' redirected and teed streams are still written to files, "
                            "and (unlike torchrun) their stderr is still kept in `stderr.log` for failure reports.",
    "--duplicate-stdout-filters": "As torchrun: lines of teed, shown streams that contain any filter (`,,` is a "
                                  "literal comma) are copied, with their prefix, to `filtered_stdout.log` in the "
                                  "round's directory.",
    "--duplicate-stderr-filters": "As `--duplicate-stdout-filters`, to `filtered_stderr.log`.",
    "--node-rank": "With the static backend, when given. Two live nodes with one rank, or a rank >= the maximum of "
                   "`--nnodes`, are errors naming the flag; a second live node with the rank waits one lease TTL for "
                   "the first to vanish. Not given: ranks are assigned (torchrun would give every node rank 0).",
    "--master-addr": "With the static backend, when given: group rank 0 must be on that host, as under torchrun.",
    "--master-port": "With the static backend, when given (torchrun's 29500 when only `--master-addr` is given on a "
                     "multi-node line). Not given: a free port on group rank 0, a fresh one each round.",
    "--local-addr": "Also the workers' `MASTER_ADDR` when this node is group rank 0. Default "
                    "`socket.getfqdn(socket.gethostname())`, as torchrun. In a multi-node job it must not resolve to "
                    "loopback: `etcd-agent doctor` checks it.",
    "--logs-specs": "An error when the entry point does not exist, as under torchrun; etcd-agent never imports "
                    "torch, keeps its own log layout and says so.",
    "--signals-to-handle": "On one of these signals the agent stops its workers with that same signal (then "
                           "`--stop-timeout`, then SIGKILL), revokes its lease (the others re-form without it at "
                           "once), and exits 128+N; exported to workers as `TORCHELASTIC_SIGNALS_TO_HANDLE`.",
    "--shutdown-timeout": "The same setting as `--stop-timeout`, whose default is 10 s where torchrun's is 30 s.",
    "--virtual-local-rank": "As torchrun: `LOCAL_RANK=0` and `CUDA_VISIBLE_DEVICES` narrowed to the worker's one "
                            "device.",
    "--etcd-endpoints": "Failover between them. `https://` means TLS (with the system's CA bundle unless "
                        "`--etcd-cacert` is given), `http://` or none plaintext; any other scheme is refused. A host "
                        "name that does not resolve fails at once; when only some of several do not, a warning names "
                        "them and the others are used.",
    "--node-id": "Two live agents with one id are refused.",
    "--last-call": "A round with MAX nodes, or one every registered node has joined, closes at once.",
    "--join-timeout": "With `--node-rank`, also the wait for the ranks below every pinned one. The error names the "
                      "missing nodes (and why an unhealthy one is missing).",
    "--worker-timeout": "Hang detection: [recovery.md](recovery.md#hang-detection).",
    "--health-check": "A program that is not there is refused at start (exit 2); see "
                      "[recovery.md](recovery.md#health-gate).",
    "--spare": "See [recovery.md](recovery.md#hot-spares).",
    "--topology": "Checked at start (exit 2 naming the flag): `/`, or `/` and 1-8 components of letters, digits, "
                  "`.`, `_`, `-`, `:`, at most 64 characters. One of `--topology` and `--topology-file`; without "
                  "either, `$SLURM_TOPOLOGY_ADDR` less the node's own name; `--topology /` ignores it. See "
                  "[cluster.md](cluster.md#topology-aware-ranks).",
    "--quarantine-after": "See [recovery.md](recovery.md#quarantine). Windows and cooldowns are at most a year.",
    "--quarantine-scope": "`cluster` writes the records under `<root>/.quarantine/`, where every job on the etcd "
                          "honours them; see [recovery.md](recovery.md#cluster-wide-quarantine).",
    "--on-quarantine": "Run by the quarantined node's own agent, once per quarantine it writes; "
                       "`deploy/slurm-drain-hook.sh` drains the node in Slurm. See "
                       "[recovery.md](recovery.md#the-scheduler-hook).",
    "--no-restart-exit-code": "Give the same value on every node. See "
                              "[recovery.md](recovery.md#do-not-restart-exit-code).",
    "--warm-restart": "Python entrypoints only (not `--no-python`); see "
                      "[recovery.md](recovery.md#warm-restarts).",
    "--preload": "A module that cannot be imported is an error at start.",
    "--metrics-port": "Serves `/metrics` over HTTP on `--local-addr`'s address when it is given, else on every "
                      "interface; needs the `metrics` extra (`pip install 'etcd-agent[metrics]'`). Without it, or with "
                      "the port in use, the agent exits 2 naming the flag before it joins the job. The metrics: "
                      "[operations.md](operations.md#agent-metrics).",
    "--health-check-timeout": "The check's output is read against the same deadline; a check past it is killed "
                              "with its process group and the node counts as unhealthy.",
    "--gpu-drain-timeout": "Longer is a failure naming the pids that still hold GPU memory; see "
                           "[recovery.md](recovery.md#gpu-memory-drain).",
    "--etcd-cacert": "Read and checked at start: PEM, within its validity dates. "
                     "[security.md](security.md) has the TLS set-up.",
    "--etcd-cert": "Checked at start: PEM, within its validity dates, matching `--etcd-key`.",
    "--etcd-user": "Under password auth a token etcd forgot (it restarted) or that expired is renewed by logging in "
                   "again.",
    "--etcd-password-file": "It leaves the agent's environment as soon as it is read, so workers never inherit it, "
                            "and a worker that prints it has it replaced by `[redacted]` in its failure report and the "
                            "job's result.",
    "--log-level": "`status`, `stop` and `events` take it too (default `WARNING`); `DEBUG` shows the traceback of an "
                   "unexpected error.",
}


@contextmanager
def _clean_environment():
    """The parser reads PET_* and ETCD_AGENT_* variables as defaults: describe the defaults without them."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(("PET_", "ETCD_AGENT_"))}
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)


def _default(action: argparse.Action) -> str:
    value = action.default
    if value is None or value == []:
        return "none"
    if value is False:
        return "off"
    if value == "":
        return '`""`'
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def _env(action: argparse.Action) -> str:
    name = getattr(action, "env_name", "")
    return f"`{name}`" if name else ""


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    params = dict(vars(action), prog=parser.prog)
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return (action.help or "") % params


def _long(action: argparse.Action) -> str:
    return next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])


def _spellings(action: argparse.Action) -> str:
    value = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
    first = _long(action)
    others = [s for s in action.option_strings if s != first]
    return ", ".join([f"`{first}{value}`"] + [f"`{s}`" for s in others])


def _flag_entry(parser: argparse.ArgumentParser, action: argparse.Action) -> list[str]:
    facts = [_spellings(action), f"default {_default(action)}"]
    if action.choices is not None:
        facts.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    if _env(action):
        facts.append(f"environment {_env(action)}")
    out = [f"### `{_long(action)}`", "", " · ".join(facts), "", _help(parser, action)]
    if _long(action) in NOTES:
        out += ["", NOTES[_long(action)]]
    return out + [""]


def _flag_groups(parser: argparse.ArgumentParser) -> list[tuple[str, list[argparse.Action]]]:
    groups = []
    for group in parser._action_groups:  # noqa: SLF001 - argparse has no public list of groups
        actions = [a for a in group._group_actions if a.option_strings and a.dest not in ("help", "version")]  # noqa: SLF001
        if actions:
            groups.append((group.title, actions))
    return groups


def _subcommand_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| flag | default | environment | meaning |", "|---|---|---|---|"]
    for group in parser._action_groups:  # noqa: SLF001
        for action in group._group_actions:  # noqa: SLF001
            if not action.option_strings or action.dest == "help":
                continue
            names = ", ".join(f"`{s}`" for s in action.option_strings)
            meaning = _help(parser, action).replace("|", "\\|")
            rows.append(f"| {names} | {_default(action)} | {_env(action)} | {meaning} |")
    return rows


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation but '-' and ' ' dropped, spaces to '-'."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in "-_ ")
    return kept.replace(" ", "-")


def _known_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}  # noqa: SLF001


def render() -> str:
    with _clean_environment():
        parser = flags.build_parser("")
        subparsers = {name: flags.subcommand_parser(name) for name in usage.SUBCOMMANDS}
    unknown = sorted(set(NOTES) - _known_flags(parser))
    if unknown:
        raise SystemExit(f"tools/gen_flags_doc.py: NOTES names flags the parser does not have: {', '.join(unknown)}")
    groups = _flag_groups(parser)
    out = [
        "# Flag reference",
        "",
        "<!-- Generated by tools/gen_flags_doc.py from etcd_agent/cli/flags.py; do not edit by hand. Regenerate",
        "     with `.venv/bin/python tools/gen_flags_doc.py --write`; tests/test_docs.py fails while it is stale. -->",
        "",
        "```",
        parser.format_usage().strip().replace("usage: ", "", 1),
        "```",
        "",
        "etcd-agent takes torchrun's whole command line, every flag in both spellings (`--nproc-per-node`, "
        "`--nproc_per_node`) with torchrun's arity, default and `PET_<NAME>` environment form (the flag wins over "
        "the variable), plus its own flags. Abbreviations that torchrun's parser accepts mean the same flag here. "
        "Everything after the training script is the script's own and is never checked. `etcd-agent doctor` takes "
        "the same flags as a launch. An unknown flag is one line naming the closest known one, exit 2.",
        "",
    ]
    out += [f"- [{title}](#{_anchor(title)})" for title, _ in groups]
    out += ["- [status, stop and events](#status-stop-and-events)", ""]
    for title, actions in groups:
        out += [f"## {title}", ""]
        for action in actions:
            out += _flag_entry(parser, action)
    out += ["## status, stop and events", "",
            "`etcd-agent status|stop|events [flags]`: the etcd flags above (with torchrun's names for the endpoint "
            "and the id as aliases), their own flags, and `--log-level`. "
            "`etcd-agent COMMAND --help` prints the same.", ""]
    for name, sub in subparsers.items():
        out += [f"### `etcd-agent {name}`", "", sub.description, ""] + _subcommand_table(sub) + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    page = render()
    if argv == ["--write"]:
        PAGE.write_text(page)
        return 0
    if argv == ["--check"]:
        if not PAGE.exists() or PAGE.read_text() != page:
            print(f"{PAGE.relative_to(ROOT)} is stale: run .venv/bin/python tools/gen_flags_doc.py --write",
                  file=sys.stderr)
            return 1
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
