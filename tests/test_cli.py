"""The torchrun command line under etcd-agent: how flags, PET_* variables and --rdzv-conf resolve (no etcd needed)."""

from __future__ import annotations

import argparse
import re
import signal

import pytest

from etcd_agent.cli import flags
from etcd_agent.config import STD_ALL, STD_OUT, StdSpec
from etcd_agent.errors import ConfigError
from etcd_agent.cli.launch import resolve
from etcd_agent.cli.rdzv_conf import parse as parse_rdzv_conf

ETCD = "127.0.0.1:2379"


@pytest.fixture
def script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in list(__import__("os").environ):
        if name.startswith(("PET_", "ETCD_AGENT_")) or name == "TORCH_ELASTIC_SHUTDOWN_TIMEOUT":
            monkeypatch.delenv(name)
    path = tmp_path / "train.py"
    path.write_text("print('hello')\n")
    return "train.py"


def launch(*argv: str):
    parser = flags.build_parser("test")
    return resolve(parser, parser.parse_args(list(argv)))


def error(*argv: str) -> str:
    with pytest.raises(ConfigError) as info:
        launch(*argv)
    return str(info.value)


# -- where etcd is ---------------------------------------------------------------------------------------------------


def test_a_one_node_line_needs_no_etcd_flag(script):
    got = launch("--nproc-per-node", "2", script, "--lr", "3e-4")
    assert got.embedded and got.cfg.spec.min_nodes == got.cfg.spec.max_nodes == 1
    assert got.cfg.workers.nproc == 2 and got.cfg.workers.args == ("--lr", "3e-4")
    assert re.fullmatch(r"[0-9a-f]{8}", got.cfg.run_id)  # fresh, as torchrun's one-node c10d default (a uuid); short
    assert got.cfg.local_addr == ""  # MASTER_ADDR is this host's name, as under torchrun


def test_one_node_run_ids_follow_torchrun(script):
    replaced = launch("--rdzv-id", "job7", script)  # torchrun replaces it with a uuid on this line
    assert re.fullmatch(r"[0-9a-f]{8}", replaced.cfg.run_id) and [n for n in replaced.notes if "job7 is replaced" in n]
    on_etcd = launch("--nnodes", "1", "--etcd-endpoints", ETCD, script).cfg.run_id  # a shared etcd: a whole uuid
    assert len(on_etcd) == 36 and on_etcd != launch("--nnodes", "1", "--etcd-endpoints", ETCD, script).cfg.run_id
    assert launch("--run-id", "job7", script).cfg.run_id == "job7"
    assert launch("--rdzv-id", "job7", "--master-port", "29501", script).cfg.run_id == "job7"
    assert launch("--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", script).cfg.run_id == "none"
    assert launch("--nnodes", "1", "--etcd-endpoints", ETCD, "--rdzv-id", "job7", script).cfg.run_id == "job7"


def test_a_multi_node_line_without_etcd_says_what_to_add(script):
    msg = error("--nnodes", "2", script)
    assert "--nnodes 2" in msg and "--etcd-endpoints HOST:2379" in msg and "\n" not in msg
    msg = error("--nnodes", "1:4", "--rdzv-backend", "static", "--rdzv-endpoint", "head:29400", script)
    assert "--rdzv-endpoint head:29400 is a static endpoint, not etcd" in msg  # c10d: see test_c10d_endpoint.py


@pytest.mark.parametrize("backend", ["etcd", "etcd-v2", "etcd-v3"])
def test_an_etcd_backend_takes_its_endpoint_from_rdzv_endpoint(script, backend):
    got = launch("--nnodes", "2", "--rdzv-backend", backend, "--rdzv-endpoint", "e1:2379,e2:2379", "--rdzv-id", "j",
                 script)
    assert not got.embedded and got.cfg.etcd.endpoints == (("e1", 2379), ("e2", 2379))


@pytest.mark.parametrize("order", ["etcd-first", "rdzv-first"])
def test_two_flags_naming_different_etcds_is_an_error_naming_both(script, order):
    pair = [["--etcd-endpoints", "a:2379"], ["--rdzv-endpoint", "b:2379"]]
    argv = sum(pair if order == "etcd-first" else pair[::-1], [])
    msg = error("--nnodes", "2", "--rdzv-backend", "etcd-v3", *argv, "--rdzv-id", "j", script)
    assert "--rdzv-endpoint b:2379" in msg and "--etcd-endpoints a:2379" in msg
    same = launch("--nnodes", "2", "--rdzv-backend", "etcd", "--rdzv-endpoint", "a", "--etcd-endpoints", "a:2379",
                  "--rdzv-id", "j", script)
    assert same.cfg.etcd.endpoints == (("a", 2379),)


def test_a_c10d_endpoint_is_not_used_for_coordination_and_one_note_says_so(script):
    got = launch("--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "head:29400", "--rdzv-id", "j",
                 "--etcd-endpoints", ETCD, script)
    assert got.cfg.etcd.endpoints == (("127.0.0.1", 2379),)
    assert [n for n in got.notes if "head:29400" in n and "not used for coordination" in n]


def test_an_endpoint_error_names_the_flag_it_came_from(script, monkeypatch):
    assert "--rdzv-endpoint" in error("--rdzv-backend", "etcd", "--rdzv-endpoint", "h:99999", script)
    monkeypatch.setenv("ETCD_AGENT_ENDPOINTS", "h:bad")
    assert "$ETCD_AGENT_ENDPOINTS" in error("--nnodes", "2", "--rdzv-id", "j", script)
    monkeypatch.delenv("ETCD_AGENT_ENDPOINTS")
    monkeypatch.setenv("PET_RDZV_ENDPOINT", "h:0")
    assert "$PET_RDZV_ENDPOINT" in error("--rdzv-backend", "etcd-v3", script)


def test_standalone_checks(script):
    assert "drop --etcd-endpoints" in error("--standalone", "--etcd-endpoints", ETCD, script)
    assert "one-node job" in error("--standalone", "--nnodes", "2", script)
    got = launch("--standalone", "--rdzv-backend", "c10d", "--rdzv-endpoint", "x:1", script)
    assert got.embedded and [n for n in got.notes if "ignored" in n]


# -- PET_* and precedence ------------------------------------------------------------------------------------------


def test_pet_variables_replace_defaults_and_flags_win(script, monkeypatch):
    monkeypatch.setenv("PET_NPROC_PER_NODE", "4")
    monkeypatch.setenv("PET_MAX_RESTARTS", "3")
    monkeypatch.setenv("PET_STANDALONE", "1")
    got = launch(script)
    assert got.cfg.workers.nproc == 4 and got.cfg.spec.max_restarts == 3 and got.embedded
    assert launch("--nproc_per_node", "2", script).cfg.workers.nproc == 2


def test_a_bad_pet_value_names_the_variable(script, monkeypatch):
    monkeypatch.setenv("PET_MAX_RESTARTS", "three")
    assert "$PET_MAX_RESTARTS='three'" in error(script)  # one line, as every usage error (no usage block)
    assert launch("--max-restarts", "2", script).cfg.spec.max_restarts == 2  # the flag wins, as under torchrun
    monkeypatch.delenv("PET_MAX_RESTARTS")
    monkeypatch.setenv("PET_START_METHOD", "thread")
    assert "$PET_START_METHOD='thread'" in error(script)
    monkeypatch.delenv("PET_START_METHOD")
    monkeypatch.setenv("PET_STANDALONE", "yes")  # torch raises a ValueError traceback here
    assert "$PET_STANDALONE" in error(script)


def test_abbreviations_resolve_as_under_torchrun(script):
    assert launch("--run-", script).cfg.workers.command()[-1] == script  # --run-path, not --run-id
    assert launch("--node_", "0", "--nnodes", "2", "--etcd-endpoints", ETCD, script).cfg.node_rank == 0
    assert launch("--redirect", "3", script).cfg.workers.redirects == StdSpec(STD_ALL)


def test_tee_takes_a_value_and_never_eats_the_entrypoint(script):
    got = launch("--tee", "3", script, "x")
    assert got.cfg.workers.entrypoint == script and got.cfg.workers.args == ("x",)
    assert got.cfg.workers.tee == StdSpec(STD_ALL)
    got = launch("-r", "0:1,1:3", "-t", "1", "--nproc-per-node", "2", script)
    assert got.cfg.workers.redirects.for_rank(0) == STD_OUT and got.cfg.workers.redirects.for_rank(1) == STD_ALL
    assert got.cfg.workers.redirects.for_rank(2) == 0
    assert "--tee" in error("--tee", "4", script)


def test_the_run_id_flags_must_agree(script):
    assert launch("--run-id", "a", "--rdzv-id", "a", script).cfg.run_id == "a"
    msg = error("--run-id", "a", "--rdzv-id", "b", script)
    assert "--run-id 'a'" in msg and "--rdzv-id 'b'" in msg


def test_a_multi_node_line_without_an_id_uses_torchruns_default_and_warns(script):
    got = launch("--nnodes", "2", "--etcd-endpoints", ETCD, script)
    assert got.cfg.run_id == "none" and [n for n in got.notes if "'none'" in n]


# -- static lines ----------------------------------------------------------------------------------------------------


def test_a_static_line_pins_rank_and_master(script):
    got = launch("--nnodes", "2", "--node_rank", "1", "--master_addr", "head", "--master_port", "29600",
                 "--etcd-endpoints", ETCD, script)
    assert (got.cfg.node_rank, got.cfg.master_addr, got.cfg.master_port) == (1, "head", 29600)
    assert got.cfg.run_id == "static-head-29600"  # the same on every node of the line, distinct per job
    got = launch("--nnodes", "2", "--node-rank", "0", "--master-addr", "head", "--etcd-endpoints", ETCD, script)
    assert got.cfg.master_port == 29500  # torchrun's default port for a static line


def test_without_node_rank_ranks_are_assigned(script):
    got = launch("--nnodes", "2", "--etcd-endpoints", ETCD, "--rdzv-id", "j", script)
    assert (got.cfg.node_rank, got.cfg.master_addr, got.cfg.master_port) == (None, None, None)


def test_a_rank_outside_nnodes_is_an_error(script):
    assert "--node-rank 2" in error("--nnodes", "2", "--node-rank", "2", "--etcd-endpoints", ETCD, script)


def test_static_flags_are_ignored_with_another_backend_and_a_note_says_so(script):
    got = launch("--nnodes", "2", "--rdzv-backend", "c10d", "--node-rank", "1", "--master-addr", "h",
                 "--etcd-endpoints", ETCD, "--rdzv-id", "j", script)
    assert got.cfg.node_rank is None and got.cfg.master_addr is None
    assert len([n for n in got.notes if "only used with --rdzv-backend static" in n]) == 2


def test_a_one_node_static_line_keeps_its_master_port(script):
    got = launch("--nproc_per_node", "2", "--master_port", "29501", script)
    assert got.embedded and (got.cfg.master_addr, got.cfg.master_port) == ("127.0.0.1", 29501)
    assert got.cfg.run_id == "none"  # torchrun keeps the static rendezvous (and its run id) here


# -- --rdzv-conf -----------------------------------------------------------------------------------------------------


def test_rdzv_conf_maps_torchruns_keys(script):
    got = launch("--rdzv-conf", "join_timeout=30,last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3",
                 script)
    assert (got.cfg.join_timeout, got.cfg.last_call, got.cfg.lease_ttl) == (30, 2, 3)


def test_rdzv_conf_takes_the_agents_own_options(script):
    got = launch("--rdzv-conf", "lease_ttl=4,scale-settle=0.5,worker_timeout=60", script)
    assert (got.cfg.lease_ttl, got.cfg.scale_settle, got.cfg.worker_timeout) == (4, 0.5, 60)


def test_rdzv_conf_unknown_and_unneeded_keys_are_named_in_notes(script):
    got = launch("--rdzv-conf", "is_host=1,close_timeout=10,colour=blue", script)
    assert [n for n in got.notes if "colour" in n] and [n for n in got.notes if "is_host" in n]


def test_rdzv_conf_contradicting_a_flag_is_an_error(script):
    msg = error("--last-call", "1", "--rdzv-conf", "last_call_timeout=5", script)
    assert "--last-call" in msg and "last_call_timeout" in msg
    assert launch("--last-call", "5", "--rdzv-conf", "last_call_timeout=5", script).cfg.last_call == 5
    assert "join_timeout" in error("--rdzv-conf", "join_timeout=5,timeout=6", script)


def backend_settings(text: str):
    """The torchrun backend's settings for the same ``--rdzv-conf`` (torch's parameters as attributes; no torch)."""
    from types import SimpleNamespace

    from etcd_agent.torch.settings import settings

    return settings(SimpleNamespace(config=parse_rdzv_conf(text), endpoint=ETCD, run_id="job", min_nodes=1,
                                    max_nodes=1, local_addr="127.0.0.1"))


@pytest.mark.parametrize("text, ttl", [
    ("keep_alive_interval=1,keep_alive_max_attempt=3", 3),
    ("keep_alive_interval=2.5,keep_alive_max_attempt=3", 8),  # rounded up to whole seconds
    ("keep_alive_interval=0.1,keep_alive_max_attempt=30", 3),  # but not for a float's last digit
    ("keep_alive_interval=0.5,keep_alive_max_attempt=1", 2),  # at least etcd's minimum TTL
    ("keep_alive_max_attempt=2", 10),  # torch's default interval, 5 s
    ("keep_alive_interval=4", 12),  # torch's default attempts, 3
    ("lease_ttl=7", 7),
    ("lease_ttl=15,keep_alive_interval=5", 15),  # they agree
])
def test_both_readers_of_rdzv_conf_make_the_same_lease_ttl(script, text, ttl):
    assert launch("--rdzv-conf", text, "--etcd-endpoints", ETCD, script).cfg.lease_ttl == ttl
    assert backend_settings(text).cfg.lease_ttl == ttl


@pytest.mark.parametrize("text", ["lease_ttl=4,keep_alive_interval=5", "keep_alive_interval=0",
                                  "keep_alive_max_attempt=1.5"])
def test_both_readers_of_rdzv_conf_refuse_the_same_keep_alive(script, text):
    assert "keep_alive" in error("--rdzv-conf", text, "--etcd-endpoints", ETCD, script)
    with pytest.raises(ConfigError, match="keep_alive"):
        backend_settings(text)


def test_a_keep_alive_ttl_must_agree_with_the_flag(script):
    msg = error("--lease-ttl", "4", "--rdzv-conf", "keep_alive_interval=2,keep_alive_max_attempt=3", script)
    assert "--lease-ttl 4" in msg and "keep_alive_interval x keep_alive_max_attempt=6" in msg


def test_the_readers_differ_only_where_the_table_says(script):
    """``timeout`` is the join timeout on etcd-agent's command line and the store's timeout under torchrun; the
    launcher's worker options are an error there, naming who reads them."""
    assert launch("--rdzv-conf", "timeout=30", script).cfg.join_timeout == 30
    got = backend_settings("timeout=30")
    assert got.store_timeout.total_seconds() == 30 and got.cfg.join_timeout == 600
    with pytest.raises(ConfigError, match="worker_timeout: not read by the etcd-v3 backend, only by etcd-agent"):
        backend_settings("worker_timeout=5")
    assert [n for n in launch("--rdzv-conf", "close_timeout=5", script).notes if "not needed" in n]


def test_a_password_is_never_taken_from_rdzv_conf(script):
    assert "visible to every user" in error("--rdzv-conf", "etcd_password=hunter2", script)


@pytest.mark.parametrize("text", ["a", "a=", "=1", "a=1,,b=2"])
def test_rdzv_conf_syntax_errors_name_the_flag(text):
    with pytest.raises(ConfigError, match="--rdzv-conf"):
        parse_rdzv_conf(text)


def test_rdzv_conf_bad_value_names_the_key(script):
    assert "join_timeout=soon: expected a number of seconds" in error("--rdzv-conf", "join_timeout=soon", script)


# -- the rest of torchrun's flags ------------------------------------------------------------------------------------


def test_shutdown_timeout_is_the_stop_grace(script, monkeypatch):
    assert launch("--shutdown-timeout", "5", script).cfg.workers.stop_timeout == 5
    assert "--shutdown-timeout" in error("--shutdown-timeout", "5", "--stop-timeout", "3", script)
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "7")
    assert launch(script).cfg.workers.stop_timeout == 7


def test_signals_to_handle(script):
    got = launch("--signals-to-handle", "SIGTERM,SIGUSR1", script)
    assert got.cfg.signals == (signal.SIGTERM, signal.SIGUSR1)
    assert got.cfg.workers.signals_to_handle == "SIGTERM,SIGUSR1"
    assert "'SIGFOO'" in error("--signals-to-handle", "SIGTERM,SIGFOO", script)
    assert "SIGKILL cannot be handled" in error("--signals-to-handle", "SIGKILL", script)


def test_role_virtual_local_rank_and_local_ranks_filter(script):
    got = launch("--role", "trainer", "--virtual-local-rank", "--local-ranks-filter", "0,2", script)
    assert got.cfg.workers.role == "trainer" and got.cfg.workers.virtual_local_rank
    assert got.cfg.workers.local_ranks_filter == frozenset({0, 2})
    assert "--local-ranks-filter" in error("--local-ranks-filter", "0,x", script)


def test_duplicate_filters_use_torchruns_comma_escape(script):
    got = launch("--duplicate-stdout-filters", "loss,,acc,step", script)
    assert got.cfg.workers.duplicate_stdout_filters == ("loss,acc", "step")


def test_accepted_flags_that_need_nothing(script):
    got = launch("--monitor-interval", "5", "--start-method", "fork", "--event-log-handler", "console",
                 "--numa-binding", "node", script)
    assert [n for n in got.notes if "--numa-binding node" in n]
    assert "torchrun.logs_specs[nope]" in error("--logs-specs", "nope", script)


def test_run_path_takes_precedence_over_no_python(script):
    got = launch("--run-path", "--no-python", script)
    assert not got.cfg.workers.no_python and got.cfg.workers.command()[-1] == script


# -- the entrypoint --------------------------------------------------------------------------------------------------


def test_a_missing_entrypoint_is_one_clear_error(script):
    assert "training script 'nope.py' not found" in error("nope.py")
    assert "no module named 'no_such_module_xyz'" in error("-m", "no_such_module_xyz")
    assert "program 'no-such-program-xyz' is not on PATH" in error("--no-python", "no-such-program-xyz")
    assert launch("-m", "json.tool").cfg.workers.module
    assert launch("--no-python", "true").cfg.workers.no_python


def test_a_module_is_found_without_running_it(script, tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise SystemExit('imported')\n")
    (pkg / "train.py").write_text("")
    assert launch("-m", "pkg.train").cfg.workers.entrypoint == "pkg.train"
    assert "pkg.nope" in error("-m", "pkg.nope")


def test_two_names_of_one_setting_must_agree_in_subcommands():
    p = argparse.ArgumentParser()
    flags.subcommand_flags(p)
    assert p.parse_args(["--rdzv-id", "a", "--run-id", "a"]).run_id == "a"
    with pytest.raises(ConfigError, match="--etcd-endpoints 'a:1' and --rdzv-endpoint 'b:1'"):
        p.parse_args(["--etcd-endpoints", "a:1", "--rdzv-endpoint", "b:1"])
