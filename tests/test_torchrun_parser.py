"""etcd-agent's parser against torch's own: every flag of ``torch.distributed.run.get_args_parser()``, walked action by
action, must exist in ``etcd_agent.cli.main.build_parser()`` with the same spellings, dest, arity, default, choices and
parsed values, and take its ``PET_<DEST>`` environment form exactly as torch's ``env``/``check_env`` actions do
(the variable replaces the default; it is read when the parser is built, so every test rebuilds both parsers after
setting the environment). Flags without an environment form in torch (``--logs-specs``, ``--numa-binding``) must
ignore ``PET_*`` as torch does.

Each case compares the whole outcome: the parsed value of every torch dest, or "error" (torch exits through argparse;
etcd-agent may raise its ConfigError instead: both count as refusing the command line).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os

import pytest

pytestmark = pytest.mark.torch

run = pytest.importorskip("torch.distributed.run")
from torch.distributed.argparse_util import check_env, env  # noqa: E402

from etcd_agent.cli import main as cli  # noqa: E402


def _clean_env() -> None:
    for name in [n for n in os.environ if n.startswith("PET_")]:
        del os.environ[name]


def _torch_actions() -> list[argparse.Action]:
    saved = {k: v for k, v in os.environ.items() if k.startswith("PET_")}
    _clean_env()
    try:
        return [a for a in run.get_args_parser()._actions if not isinstance(a, argparse._HelpAction)]
    finally:
        os.environ.update(saved)


TORCH_ACTIONS = _torch_actions()
OPTIONS = [a for a in TORCH_ACTIONS if a.option_strings]
POSITIONALS = [a for a in TORCH_ACTIONS if not a.option_strings]
TORCH_DESTS = [a.dest for a in TORCH_ACTIONS]
ENV_ACTIONS = [a for a in OPTIONS if isinstance(a, (env, check_env))]
SWITCHES = {a.dest for a in OPTIONS if a.nargs == 0}

# A value for each flag that is not its default (so a flag that is ignored shows), a second one for the PET_*
# form (so "the flag wins over the environment" shows), and values torch refuses.
SAMPLES = {
    "nnodes": ("1:2", "3", []),
    "nproc_per_node": ("4", "gpu", []),
    "rdzv_backend": ("c10d", "etcd-v2", []),
    "rdzv_endpoint": ("localhost:29400", "10.0.0.1:2379", []),
    "rdzv_id": ("job7", "4711", []),
    "rdzv_conf": ("join_timeout=5,last_call_timeout=1", "timeout=900", []),
    "max_restarts": ("3", "7", ["x", "1.5"]),
    "monitor_interval": ("0.5", "5", ["fast"]),
    "start_method": ("fork", "forkserver", ["thread"]),
    "event_log_handler": ("console", "dynamic_rendezvous", []),
    "role": ("trainer", "rank", []),
    "log_dir": ("/tmp/compat-logs", "/var/log/torch/elastic", []),
    "redirects": ("3", "0:3,1:1", []),
    "tee": ("3", "0:1,1:2", []),
    "local_ranks_filter": ("0", "0,1,2", []),
    "duplicate_stdout_filters": ("apple,orange", "a,,b,c", []),
    "duplicate_stderr_filters": ("error", "x,,y", []),
    "node_rank": ("1", "3", ["first"]),
    "master_addr": ("10.0.0.1", "head-node", []),
    "master_port": ("29501", "1234", ["http"]),
    "local_addr": ("127.0.0.1", "node-7.example", []),
    "logs_specs": ("default", "custom", []),
    "signals_to_handle": ("SIGTERM,SIGUSR1", "SIGUSR2", []),
    "shutdown_timeout": ("15", "60", ["soon"]),
}


def _samples(action: argparse.Action) -> tuple[str, str, list[str]]:
    if action.choices:
        choices = [str(c) for c in action.choices]
        return choices[-1], choices[0], ["no-such-choice"]
    if action.dest in SAMPLES:
        return SAMPLES[action.dest]
    # A flag a later torch adds: still compared, with a generic value.
    return ("7", "9", []) if action.type in (int, float) else ("x", "y", [])


def _outcome(build, argv: list[str]):
    """("ok", {torch dest: value}) or ("error",): what a parser makes of argv (the environment as it is now)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            ns = build().parse_args(argv)
    except SystemExit:
        return ("error",)
    except Exception as exc:  # etcd-agent's ConfigError (a clear refusal); anything else is a bug we want to see
        if type(exc).__name__ != "ConfigError":
            raise
        return ("error",)
    return ("ok", {dest: getattr(ns, dest, "<missing>") for dest in TORCH_DESTS})


def _both(argv: list[str]):
    return _outcome(run.get_args_parser, argv), _outcome(cli.build_parser, argv)


def _ours_by_option() -> dict[str, argparse.Action]:
    return dict(cli.build_parser()._option_string_actions)


@pytest.fixture(autouse=True)
def _no_pet_env(monkeypatch):
    for name in [n for n in os.environ if n.startswith("PET_")]:
        monkeypatch.delenv(name)


def _ids(actions):
    return [a.option_strings[-1] if a.option_strings else a.dest for a in actions]


# --- the shape of every flag ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("action", OPTIONS, ids=_ids(OPTIONS))
def test_spellings_dest_and_arity(action):
    ours = _ours_by_option()
    missing = [s for s in action.option_strings if s not in ours]
    assert not missing, f"etcd-agent has no {missing} (torchrun: {action.option_strings})"
    for spelling in action.option_strings:
        mine = ours[spelling]
        assert mine.dest == action.dest, f"{spelling}: dest {mine.dest!r}, torchrun {action.dest!r}"
        assert mine.nargs == action.nargs, f"{spelling}: nargs {mine.nargs!r}, torchrun {action.nargs!r}"
        assert mine.const == action.const, f"{spelling}: const {mine.const!r}, torchrun {action.const!r}"
        assert bool(mine.required) == bool(action.required), f"{spelling}: required differs"
        if action.choices is not None:
            assert mine.choices is not None and list(mine.choices) == list(action.choices), \
                f"{spelling}: choices {mine.choices}, torchrun {action.choices}"
        else:
            assert mine.choices is None, f"{spelling}: choices {mine.choices}, torchrun has none"


@pytest.mark.parametrize("action", TORCH_ACTIONS, ids=_ids(TORCH_ACTIONS))
def test_default(action):
    torch_out, ours = _both(["train.py"])
    assert torch_out[0] == "ok"
    assert ours[0] == "ok", "etcd-agent refuses a bare 'train.py'"
    got, want = ours[1][action.dest], torch_out[1][action.dest]
    assert got == want and type(got) is type(want), f"{action.dest}: default {got!r}, torchrun {want!r}"


# --- values on the command line -------------------------------------------------------------------------------------

def _forms(spelling: str, value: str | None) -> list[list[str]]:
    if value is None:
        return [[spelling, "train.py"]]
    forms = [[spelling, value, "train.py"]]
    if spelling.startswith("--"):
        forms.append([f"{spelling}={value}", "train.py"])
    else:
        forms.append([f"{spelling}{value}", "train.py"])
    return forms


@pytest.mark.parametrize("action", OPTIONS, ids=_ids(OPTIONS))
def test_parsed_values(action):
    value, other, bad = _samples(action)
    values = [None] if action.dest in SWITCHES else [value, other, *bad, ""]
    failures = []
    for spelling in action.option_strings:
        for v in values:
            for argv in _forms(spelling, v):
                torch_out, ours = _both(argv)
                if torch_out != ours:
                    failures.append(f"{argv}: etcd-agent {_show(ours, action)}, torchrun {_show(torch_out, action)}")
    # The flag given twice: the last one wins under torchrun.
    if action.dest not in SWITCHES:
        argv = [action.option_strings[0], value, action.option_strings[-1], other, "train.py"]
        torch_out, ours = _both(argv)
        if torch_out != ours:
            failures.append(f"{argv}: etcd-agent {_show(ours, action)}, torchrun {_show(torch_out, action)}")
    assert not failures, "\n".join(failures)


def _show(outcome, action) -> str:
    if outcome[0] != "ok":
        return "refuses it"
    value = outcome[1][action.dest]
    others = {k: v for k, v in outcome[1].items() if k != action.dest}
    return f"{action.dest}={value!r} (others {others})" if len(str(others)) < 400 else f"{action.dest}={value!r}"


# --- PET_<DEST> -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("action", OPTIONS, ids=_ids(OPTIONS))
def test_pet_environment_form(action, monkeypatch):
    value, other, _ = _samples(action)
    if action.dest in SWITCHES:
        cases = [("1", [[action.option_strings[0], "train.py"], ["train.py"]]),
                 ("0", [[action.option_strings[0], "train.py"], ["train.py"]]),
                 ("2", [["train.py"]])]
    else:
        cases = [(other, [["train.py"], [action.option_strings[0], value, "train.py"],
                          [f"{action.option_strings[-1]}={value}", "train.py"]])]
    # For flags without an environment form in torch (--logs-specs, --numa-binding) the same cases check that the
    # variable changes nothing.
    failures = _env_cases(action, cases, monkeypatch)
    assert not failures, "\n".join(failures)


BAD_VALUE_FLAGS = [a for a in OPTIONS if _samples(a)[2]]


@pytest.mark.parametrize("action", BAD_VALUE_FLAGS, ids=_ids(BAD_VALUE_FLAGS))
def test_pet_variable_with_a_bad_value(action, monkeypatch):
    """A PET_* value torch's type or choices refuse: torchrun refuses it only when no flag overrides it (argparse
    converts a string default only when it is used) and never checks choices of a default; etcd-agent must do
    the same (or the difference must be documented as deliberate)."""
    value, _, bad = _samples(action)
    cases = [(b, [["train.py"], [action.option_strings[0], value, "train.py"]]) for b in bad]
    if action.choices is not None and isinstance(action, env):
        # Deliberate (README): torch never checks a PET_* default against the choices and runs with the bad value;
        # etcd-agent refuses it, naming the variable, when no flag overrides it. With the flag both take the flag.
        cases = [(b, [[action.option_strings[0], value, "train.py"]]) for b in bad]
        for b in bad:
            monkeypatch.setenv(f"PET_{action.dest.upper()}", b)
            assert _outcome(cli.build_parser, ["train.py"]) == ("error",), f"PET_{action.dest.upper()}={b!r}"
            monkeypatch.delenv(f"PET_{action.dest.upper()}")
    failures = _env_cases(action, cases, monkeypatch)
    assert not failures, "\n".join(failures)


def _env_cases(action, cases, monkeypatch) -> list[str]:
    name = f"PET_{action.dest.upper()}"
    failures = []
    for env_value, argvs in cases:
        monkeypatch.setenv(name, env_value)
        for argv in argvs:
            torch_out, ours = _both(argv)  # both parsers are built now, with the variable set
            if torch_out != ours:
                failures.append(f"{name}={env_value!r} {argv}: etcd-agent {_show(ours, action)}, "
                                f"torchrun {_show(torch_out, action)}")
    monkeypatch.delenv(name)
    return failures


def test_every_env_action_is_covered():
    """The walk above reaches every env/check_env flag torch has (a new torch flag is not silently skipped)."""
    assert {a.dest for a in ENV_ACTIONS} <= {a.dest for a in OPTIONS}
    assert {"logs_specs", "numa_binding"} <= {a.dest for a in OPTIONS} - {a.dest for a in ENV_ACTIONS}


def test_all_pet_variables_at_once(monkeypatch):
    """Every PET_* form set together (as a Kubernetes/TorchX spec does) gives torch's namespace."""
    for action in OPTIONS:
        value = "1" if action.dest in SWITCHES else _samples(action)[1]
        if action.dest in ("no_python", "run_path"):
            value = "0"  # torch itself refuses nothing at parse time, but keep the line runnable
        monkeypatch.setenv(f"PET_{action.dest.upper()}", value)
    torch_out, ours = _both(["train.py", "--lr", "0.1"])
    assert torch_out == ours


# --- positionals, REMAINDER, abbreviations ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["train.py"],
    ["train.py", "--nnodes", "3", "--lr=0.1"],
    ["--nproc-per-node", "2", "train.py", "--nproc-per-node", "8"],
    ["-m", "torchtitan.train", "--module", "llama3", "--config", "llama3_debugmodel"],
    ["--no-python", "/bin/echo", "hello"],
    ["--standalone", "--nproc_per_node=4", "train.py", "config/train_gpt2.py"],
    ["--nnodes=1:2", "train.py", "--", "x"],
    ["train.py", "-m", "--tee", "3"],
    [],
    ["--nnodes", "2"],
], ids=lambda argv: " ".join(argv) or "<empty>")
def test_positionals_and_script_args(argv):
    torch_out, ours = _both(argv)
    assert ours == torch_out, f"{argv}: etcd-agent {ours}, torchrun {torch_out}"


def test_abbreviation_from_torchs_own_tests():
    """torch's launcher test passes ``--redirect=3 --tee=3`` (argparse's prefix matching of --redirects)."""
    argv = ["--redirect=3", "--tee=3", "--no-python", "test_script.sh"]
    torch_out, ours = _both(argv)
    assert torch_out[0] == "ok" and ours == torch_out


@pytest.mark.parametrize("spelling", [s for a in OPTIONS for s in a.option_strings if s.startswith("--")])
def test_every_abbreviation_torchrun_accepts(spelling):
    """Every unambiguous prefix of a torchrun flag means that flag under etcd-agent too."""
    action = next(a for a in OPTIONS if spelling in a.option_strings)
    value = None if action.dest in SWITCHES else _samples(action)[0]
    failures = []
    for cut in range(3, len(spelling)):
        prefix = spelling[:cut]
        argv = [prefix, "train.py"] if value is None else [prefix, value, "train.py"]
        torch_out, ours = _both(argv)
        if torch_out[0] == "ok" and ours != torch_out:
            failures.append(f"{prefix}: etcd-agent {_show(ours, action)}, torchrun {_show(torch_out, action)}")
    assert not failures, "\n".join(failures)
