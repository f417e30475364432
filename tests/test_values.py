"""values.py: every value of the schema as a typed record, written and read back, validated on read."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from etcd_agent.errors import BadKeyData
from etcd_agent.schema.keys import Keys, encode
from etcd_agent.schema.values import (RECORDS, Exit, Failure, Join, JobPointer, Member, NodeInfo, Outcome, Phase, Plan,
                                      PlanPart, Progress, RankClaim, Restarts, Result, RoundInfo, SpecValue, read_value)

PACKAGE = Path(__file__).resolve().parent.parent / "etcd_agent"
K = Keys("/etcd-agent", "job1", 1)


class KV:
    def __init__(self, key: str, value: bytes, mod_revision: int = 7, create_revision: int = 5, lease: int = 0):
        self.key, self.value = key, value
        self.mod_revision, self.create_revision, self.lease = mod_revision, create_revision, lease


FAILURE = Failure(2, 0, 4242, 3, None, "boom\nmore", "/logs/error.json", "tail", 12.5, 3, "node-b")
EXAMPLES = [
    (K.run.job(), JobPointer(2, 1.5)),
    (K.spec(), SpecValue(1, 4, "gpu", 3)),
    (K.spec(), SpecValue(1, 4, "gpu", 3, 600.0)),
    (K.node("a"), NodeInfo("a", "host-a", "10.0.0.1", 99, "1.0", 8, "7f", 2.0, checking=True, mod_revision=7)),
    (K.node_rank(1), RankClaim("a", 1, "host-a", 99, "7f")),
    (K.round(), RoundInfo(3, Phase.RUNNING, "2 node(s): a, b", 7, 2, 9.0, 2, scaled_for=6)),
    (K.restarts(), Restarts(1, 3, 7)),
    (K.restarts(), Restarts(4, 20, 7, stall_limit=3, best_step=1200, stalled=2)),
    (K.progress("a"), Progress("a", 3, 1200, 2.5, 9.0)),
    (K.join(3, "a"), Join("a", 5, "host-a", "10.0.0.1", 29500, 8, 0, 0, None, None, None, 4.0)),
    (K.plan(3), Plan(3, (), "10.0.0.1", 29500, 1, 3, 7, "a", parts=1, size=2, workers=12)),
    (K.plan_part(3, 0), PlanPart(3, 0, ((Member("a", 0, "", "10.0.0.1", 8, 0), "b"),
                                        (Member("b", 1, "", "10.0.0.2", 4, 8), "a")))),
    (K.exit(3, "a"), Exit("a", Outcome.SUCCEEDED, 8.0)),
    (K.failure(3, "b"), FAILURE),
    (K.result(), Result(Outcome.FAILED, 3, "the restart budget is spent", FAILURE, 3, 20.0)),
]


@pytest.mark.parametrize("key, record", EXAMPLES, ids=[type(r).__name__ for _k, r in EXAMPLES])
def test_every_record_reads_back_what_it_wrote(key, record):
    kv = KV(key, record.encode())
    stored = json.loads(kv.value)
    assert stored["v"] == 1
    assert type(record).from_kv(kv) == record
    parsed = K.parse(key).kind if key.startswith(K.prefix) else None
    if parsed:
        assert isinstance(read_value(parsed, kv), type(record))


def test_every_kind_of_key_with_a_value_has_a_record():
    assert set(RECORDS) == {"spec", "node", "node_rank", "quarantine", "round", "restarts", "join", "plan", "plan_part",
                            "exit", "failure", "result", "progress"}


def test_phases_and_outcomes_are_the_words_stored():
    assert RoundInfo(1, Phase.JOINING).to_json()["phase"] == "joining"
    assert json.loads(RoundInfo(1, Phase.DONE).encode())["phase"] == "done"
    assert f"{Phase.RUNNING}" == str(Phase.RUNNING) == "running" and Phase.RUNNING == "running"
    assert f"job {Outcome.STOPPED}" == "job stopped"
    assert [p.final for p in Phase] == [False, False, True, True, True]
    assert RoundInfo.read(K.round(), b'{"v":1,"round":2,"phase":"failed"}').phase is Phase.FAILED


def test_a_round_without_optional_fields_is_stored_without_them():
    assert json.loads(RoundInfo(2, Phase.JOINING, "why", time=3.0).encode()) == {
        "v": 1, "round": 2, "phase": "joining", "reason": "why", "time": 3.0}


def test_a_spec_records_the_join_timeout_only_when_given_and_an_older_spec_reads_without_it():
    assert "join_timeout" not in json.loads(SpecValue(1, 4, "gpu", 3).encode())
    older = b'{"v":1,"min_nodes":2,"max_nodes":2,"nproc_per_node":"1","max_restarts":0}'  # before join_timeout
    assert SpecValue.read(K.spec(), older) == SpecValue(2, 2, "1", 0, None)
    assert SpecValue.read(K.spec(), older[:-1] + b',"join_timeout":600}').join_timeout == 600.0


@pytest.mark.parametrize("record, key, raw, problem", [
    (RoundInfo, K.round(), b'{"v":1,"round":1,"phase":"sleeping"}', "phase must be one of joining, running"),
    (RoundInfo, K.round(), b'{"v":1,"round":"1","phase":"joining"}', "round must be a whole number, not '1'"),
    (RoundInfo, K.round(), b'{"v":1,"round":0,"phase":"joining"}', "round must be a positive integer"),
    (RoundInfo, K.round(), b'{"v":1,"round":3,"phase":"joining","last_plan":3}', "last_plan must be a round before 3"),
    (RoundInfo, K.round(), b'{"v":1,"phase":"joining"}', "missing field(s) round"),
    (Restarts, K.restarts(), b'{"v":1,"used":-1,"max":3}', "used and max must be whole numbers"),
    (Restarts, K.restarts(), b'{"v":1,"used":true,"max":3}', "used must be a whole number, not True"),
    (Join, K.join(1, "a"), b'{"v":1,"node":"a","addr":"x","port":"29500","nproc":1}', "port must be a whole number"),
    (Join, K.join(1, "a"), b'{"v":1,"node":"a","addr":"x","port":1,"nproc":1,"node_rank":-1}', "node_rank must be 0"),
    (Join, K.join(1, "a"), b'{"v":1,"node":"a","addr":"x","port":1,"nproc":1,"master_port":70000}', "1-65535"),
    (Join, K.join(1, "a"), b'{"v":1,"node":"a","port":1,"nproc":1}', "missing field(s) addr"),
    (Plan, K.plan(1), b'{"v":1,"round":1,"members":[["a",0,"x"]],"master_addr":"x","master_port":1,'
                      b'"restart_count":0}', "nproc must be at least 1"),
    (Plan, K.plan(1), b'{"v":1,"round":1,"members":[],"master_addr":"x","master_port":1,"restart_count":0}',
     "members must be a non-empty list"),
    (Exit, K.exit(1, "a"), b'{"v":1,"node":"a","outcome":"maybe"}', "outcome must be one of succeeded, failed"),
    (Failure, K.failure(1, "a"), b'{"v":1,"rank":"two"}', "rank must be a whole number or null, not 'two'"),
    (Failure, K.failure(1, "a"), b'{"v":1,"hang":"yes"}', "hang must be true or false"),
    (Result, K.result(), b'{"v":1,"outcome":"failed","round":1,"root_cause":{"v":1,"rank":"x"}}',
     "root_cause: rank must be a whole number or null"),
    (Result, K.result(), b'{"v":1,"outcome":"failed","round":1,"root_cause":[1]}', "root_cause must be an object"),
    (JobPointer, "/etcd-agent/job1/job", b'{"v":1,"gen":0}', "gen must be a positive integer"),
    (SpecValue, K.spec(), b'{"v":1,"min_nodes":1,"max_nodes":2,"max_restarts":0}', "missing field(s) nproc_per_node"),
    (NodeInfo, K.node("a"), b'{"v":1,"pid":"12"}', "pid must be a whole number or null"),
    (NodeInfo, K.node("a"), b'[1, 2]', "not a JSON object"),
    (NodeInfo, K.node("a"), b'{"v":2}', "schema version 2"),
])
def test_a_bad_value_names_its_key_and_field(record, key, raw, problem):
    with pytest.raises(BadKeyData) as caught:
        record.read(key, raw)
    assert caught.value.key == key and problem in str(caught.value), str(caught.value)


def test_fields_a_record_does_not_know_are_ignored():
    raw = encode({"used": 1, "max": 2, "added_by_a_newer_agent": [1, 2]})
    assert Restarts.read(K.restarts(), raw) == Restarts(1, 2)


def test_a_failure_describes_how_it_ended_and_its_first_line():
    assert FAILURE.how_it_ended() == "exit code 3" and FAILURE.headline == "boom"
    assert Failure(1, signal="SIGKILL").how_it_ended() == "signal SIGKILL"
    assert Failure(1, hang=True, exitcode=None).how_it_ended() == "hung"
    assert Failure(1, exitcode=-9).how_it_ended() == "signal SIGKILL"  # the one wording of proctree.describe_exit
    assert Failure(1, exitcode=-40).how_it_ended() == "signal SIG40"  # a real-time signal has no name
    assert Failure(1).how_it_ended() == "failed"
    assert Failure(None, node="n", message="m").describe() == "the worker group on n failed (m)"
    redacted = FAILURE.with_strings(lambda text: text.replace("boom", "[redacted]"))
    assert redacted.message == "[redacted]\nmore" and redacted.rank == 2


def _calls_to(tree: ast.AST, name: str) -> list[int]:
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
            and ((isinstance(n.func, ast.Name) and n.func.id == name)
                 or (isinstance(n.func, ast.Attribute) and n.func.attr == name and isinstance(n.func.value, ast.Name)
                     and n.func.value.id == "keys"))]


def test_no_module_but_values_encodes_a_value_by_hand():
    """Every value is written through its record: ``keys.encode`` is called in the record codec only."""
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("codec.py", "keys.py"):
            continue
        tree = ast.parse(path.read_text())
        imported = any(isinstance(n, ast.ImportFrom) and n.module and n.module.endswith("keys")
                       and any(a.name == "encode" for a in n.names) for n in ast.walk(tree))
        lines = _calls_to(tree, "encode") if imported else []
        if lines:
            offenders[str(path.relative_to(PACKAGE))] = lines
    assert offenders == {}
