"""The key schema: exact key strings, round-number ordering, parse() round trips and rejections, value encoding."""

from __future__ import annotations

import json

import pytest

from etcd_agent.errors import BadKeyData
from etcd_agent.schema.keys import SCHEMA_VERSION, Keys, ParsedKey, RunKeys, decode, encode

K = Keys("/etcd-agent", "job1", 1)
P = "/etcd-agent/job1/0001/"
R = RunKeys("/etcd-agent", "job1")


@pytest.mark.parametrize("built, expected", [
    (K.prefix, "/etcd-agent/job1/0001/"),
    (K.run.prefix, "/etcd-agent/job1/"),
    (K.run.job(), "/etcd-agent/job1/job"),
    (R.prefix, "/etcd-agent/job1/"),
    (R.job(), "/etcd-agent/job1/job"),
    (R.generation(12).spec(), "/etcd-agent/job1/0012/spec"),
    (Keys("/etcd-agent", "job1", 12345).prefix, "/etcd-agent/job1/12345/"),
    (K.spec(), "/etcd-agent/job1/0001/spec"),
    (K.nodes(), "/etcd-agent/job1/0001/nodes/"),
    (K.node("node-a"), "/etcd-agent/job1/0001/nodes/node-a"),
    (K.round(), "/etcd-agent/job1/0001/round"),
    (K.restarts(), "/etcd-agent/job1/0001/restarts"),
    (K.result(), "/etcd-agent/job1/0001/result"),
    (K.rounds(), "/etcd-agent/job1/0001/r/"),
    (K.round_dir(3), "/etcd-agent/job1/0001/r/00000003/"),
    (K.joins(3), "/etcd-agent/job1/0001/r/00000003/join/"),
    (K.join(3, "node-a"), "/etcd-agent/job1/0001/r/00000003/join/node-a"),
    (K.plan(3), "/etcd-agent/job1/0001/r/00000003/plan"),
    (K.exits(3), "/etcd-agent/job1/0001/r/00000003/exit/"),
    (K.exit(3, "node-a"), "/etcd-agent/job1/0001/r/00000003/exit/node-a"),
    (K.failures(3), "/etcd-agent/job1/0001/r/00000003/failures/"),
    (K.failure(3, "node-a"), "/etcd-agent/job1/0001/r/00000003/failures/node-a"),
])
def test_every_builder_gives_the_documented_key(built, expected):
    assert built == expected


def test_every_key_of_a_round_lies_under_its_round_dir_and_every_key_under_the_prefix():
    for key in (K.join(7, "n"), K.plan(7), K.exit(7, "n"), K.failure(7, "n")):
        assert key.startswith(K.round_dir(7))
        assert key.startswith(K.rounds())
    for key in (K.spec(), K.node("n"), K.round(), K.restarts(), K.result(), K.plan(1)):
        assert key.startswith(K.prefix)


def test_lexical_order_of_round_dirs_is_numeric_order():
    numbers = [100, 9, 10, 1, 99999999]
    dirs = [K.round_dir(n) for n in numbers]
    assert sorted(dirs) == [K.round_dir(n) for n in sorted(numbers)]
    plans = [K.plan(n) for n in numbers]
    assert sorted(plans) == [K.plan(n) for n in sorted(numbers)]


@pytest.mark.parametrize("key, parsed", [
    (K.spec(), ParsedKey("spec")),
    (K.round(), ParsedKey("round")),
    (K.restarts(), ParsedKey("restarts")),
    (K.result(), ParsedKey("result")),
    (K.node("node-a"), ParsedKey("node", node="node-a")),
    (K.join(3, "node-a"), ParsedKey("join", round=3, node="node-a")),
    (K.plan(3), ParsedKey("plan", round=3)),
    (K.exit(3, "node-a"), ParsedKey("exit", round=3, node="node-a")),
    (K.failure(3, "node-a"), ParsedKey("failure", round=3, node="node-a")),
    (K.join(10, "n.1_x"), ParsedKey("join", round=10, node="n.1_x")),
    (K.plan(99999999), ParsedKey("plan", round=99999999)),
])
def test_parse_round_trips_every_builder(key, parsed):
    assert K.parse(key) == parsed


def test_parse_works_for_another_root_run_and_generation():
    other = Keys("/jobs/team-a", "run.7", 3)
    assert other.parse(other.exit(12, "gpu-3")) == ParsedKey("exit", round=12, node="gpu-3")
    assert other.parse(other.spec()) == ParsedKey("spec")


def test_every_generation_lies_under_the_run_prefix_and_the_pointer_under_none():
    for gen in (1, 2, 10, 9999, 10000):
        keys = R.generation(gen)
        assert keys == Keys("/etcd-agent", "job1", gen) and keys.run == R
        assert keys.prefix.startswith(R.prefix) and keys.run.job() == R.job()
        for key in (keys.spec(), keys.result(), keys.join(3, "n")):
            assert R.generation_of(key) == gen
    assert not R.job().startswith(K.prefix)
    assert R.generation_of(R.job()) is None


def test_lexical_order_of_generations_is_numeric_order_up_to_9999():
    numbers = [100, 9, 10, 1, 9999]
    assert sorted(R.generation(n).prefix for n in numbers) == [R.generation(n).prefix for n in sorted(numbers)]


@pytest.mark.parametrize("key", [
    "/etcd-agent/job1/job", "/etcd-agent/job1/spec", "/etcd-agent/job1/1/spec", "/etcd-agent/job1/00001/spec",
    "/etcd-agent/job1/0000/spec", "/etcd-agent/job1/0001", "/etcd-agent/job1/00a1/spec", "/etcd-agent/job10/0001/spec",
    "/other/job1/0001/spec", "/etcd-agent/job1/000٣/spec",
])
def test_generation_of_names_only_formatted_generation_prefixes(key):
    assert R.generation_of(key) is None


@pytest.mark.parametrize("gen", [0, -1, "1", 1.0, True, None])
def test_a_generation_is_a_positive_integer(gen):
    with pytest.raises(ValueError):
        Keys("/etcd-agent", "job1", gen)


@pytest.mark.parametrize("key", [
    # foreign keys and other prefixes
    "/other/job1/spec",
    "/etcd-agent/job2/spec",
    "/etcd-agent/job10/spec",  # shares the text "/etcd-agent/job1" but not the prefix with its slash
    "/etcd-agent/job1",
    "etcd-agent/job1/spec",
    "/etcd-agent/job1/",
    "/etcd-agent/job1/0001",
    # the run level and other generations of the same run
    "/etcd-agent/job1/job",
    "/etcd-agent/job1/spec",
    "/etcd-agent/job1/0002/spec",
    "/etcd-agent/job1/00001/spec",
    "/etcd-agent/job1/1/spec",
    # names the schema does not have
    P + "specs",
    P + "spec/",
    P + "leader",
    P + "nodes/",
    P + "r/",
    P + "r/00000003/",
    P + "r/00000003/leader/node-a",
    P + "r/00000003/join/",
    # wrong padding
    P + "r/3/plan",
    P + "r/0000003/plan",
    P + "r/000000003/plan",
    P + "r/3/join/node-a",
    P + "r/abcdefgh/plan",
    P + "r/-0000003/plan",
    P + "r/+0000003/plan",
    # extra path parts
    P + "nodes/node-a/x",
    P + "r/00000003/plan/x",
    P + "r/00000003/join/node-a/x",
    P + "r/00000003/exit/node-a/",
    P + "r/00000003/failures/node-a/x",
    P + "r/00000003/failure/node-a",  # the directory is "failures"
])
def test_parse_rejects_keys_outside_the_schema_naming_the_key(key):
    with pytest.raises(BadKeyData) as caught:
        K.parse(key)
    assert caught.value.key == key
    assert key in str(caught.value)


def test_parse_rejects_a_round_with_a_superscript_digit():
    with pytest.raises(BadKeyData):
        K.parse(P + "r/0000000²/plan")


def test_parse_rejects_a_round_with_non_ascii_digits():
    with pytest.raises(BadKeyData):
        K.parse(P + "r/0000000٣/plan")


def test_encode_adds_the_schema_version_as_compact_json():
    raw = encode({"round": 3, "phase": "joining"})
    assert isinstance(raw, bytes)
    assert json.loads(raw) == {"v": 1, "round": 3, "phase": "joining"}
    assert b" " not in raw
    assert SCHEMA_VERSION == 1


def test_encode_then_decode_round_trips():
    obj = {"node": "node-a", "port": 29500, "prev_rank": None, "nested": {"a": [1, 2]}}
    assert decode(K.join(3, "node-a"), encode(obj)) == {"v": 1, **obj}


@pytest.mark.parametrize("raw, problem", [
    (b"not json", "not JSON"),
    (b"{", "not JSON"),
    (b"", "not JSON"),
    (b"\x80\x81{}", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'"text"', "not a JSON object"),
    (b"3", "not a JSON object"),
    (b"null", "not a JSON object"),
    (b'{"v": 2, "round": 1}', "schema version 2"),
    (b'{"v": "1", "round": 1}', "schema version '1'"),
    (b'{"round": 1}', "schema version None"),
])
def test_decode_errors_name_the_key(raw, problem):
    key = K.round()
    with pytest.raises(BadKeyData) as caught:
        decode(key, raw)
    assert caught.value.key == key
    assert key in str(caught.value)
    assert problem in str(caught.value)


def test_encode_always_writes_the_schema_version():
    assert json.loads(encode({"v": 2, "a": 1})) == {"v": 1, "a": 1}


@pytest.mark.parametrize("raw", [b'{"v": true}', b'{"v": 1.0}'])
def test_decode_requires_an_integer_version(raw):
    with pytest.raises(BadKeyData):
        decode("/k", raw)


def test_node_rank_claims_have_one_spelling():
    assert K.node_rank(3) == P + "node_ranks/3"
    assert K.parse(K.node_rank(12)) == ParsedKey("node_rank", rank=12)
    for odd in ("node_ranks/", "node_ranks/03", "node_ranks/-1", "node_ranks/x", "node_ranks/1/x", "node_ranks/³"):
        with pytest.raises(BadKeyData, match="not a key of the etcd-agent schema"):
            K.parse(P + odd)
