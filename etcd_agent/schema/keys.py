"""The whole key schema of one run, as pure functions; no other module formats a key.

A run id names a run; each time its command line is started after the previous job ended, the run gets a new job
(a generation). Run prefix ``R = <root>/<run_id>/``; job prefix ``P = R<gen:04d>/``. Every value is a JSON object
carrying ``"v": 1``; ``values.py`` defines each one as a typed record, validated on read::

    R/job                           {gen}: the run's current job; unleased, moved only by a guarded txn
    P/spec                          job spec, created once, checked by every later agent
    P/nodes/<node>                  leased: the alive registry
    P/node_ranks/<rank>             leased: held by the node started with --node-rank <rank>, create-if-absent
    P/quarantine/<node>             unleased: this node's recent worker failures, and until when it sits out
    P/round                         {round, phase, reason}; its mod_revision fences every round transition
    P/restarts                      {used, max}: the job-wide restart budget
    P/r/<round:08d>/join/<node>     leased: joined this round
    P/r/<round:08d>/plan            the round's plan header: sizes, master address, leader, number of parts B
    P/r/<round:08d>/plan/<b>        part b of its members (0 <= b < B): each member's ranks and ring predecessor
    P/r/<round:08d>/exit/<node>     this node's workers all succeeded
    P/r/<round:08d>/failures/<node> this node's failure report
    P/result                        the job's final outcome
    P/progress/<node>               leased: the node's latest training step and step rate, put at a bounded rate
    P/store/<round:08d>/<key>       the c10d Store of a round under torchrun's ``etcd-v3`` backend (any key torch
                                    or the user writes; outside ``P/r/`` so that the round's watchers never see it)

Outside every run, at the root (``.quarantine`` cannot be a run id: a run id begins with a letter or digit)::

    <root>/.quarantine/<node>       unleased: a cluster-wide quarantine (--quarantine-scope cluster, or an operator's
                                    ``etcd-agent quarantine add``): every job on this etcd skips the node until then

Earlier jobs of the run keep their keys under their own ``P``. Zero-padded numbers keep lexical order equal to
numeric order. Imports only ``errors``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any

from ..errors import BadKeyData

SCHEMA_VERSION = 1
ROUND_DIGITS = 8
GEN_DIGITS = 4
_ROUND_RE = re.compile(f"[0-9]{{{ROUND_DIGITS}}}")
_GEN_RE = re.compile(f"[0-9]{{{GEN_DIGITS},}}")
_RANK_RE = re.compile("0|[1-9][0-9]*")


@dataclasses.dataclass(frozen=True)
class ParsedKey:
    """What a key under the prefix means: ``kind`` is one of spec, node, node_rank, round, restarts, result, join,
    plan, plan_part, exit, failure, store, progress; ``round``, ``node``, ``rank`` and ``part`` are set where the key
    carries them."""

    kind: str
    round: int | None = None
    node: str | None = None
    rank: int | None = None
    part: int | None = None


CLUSTER_QUARANTINE_DIR = ".quarantine"


def cluster_quarantines(root: str) -> str:
    """The directory of the cluster-wide quarantine records under ``root`` (with a trailing slash)."""
    return f"{root}/{CLUSTER_QUARANTINE_DIR}/"


def cluster_quarantine(root: str, node: str) -> str:
    """A node's cluster-wide quarantine record: honoured by every job under ``root``."""
    return cluster_quarantines(root) + node


@dataclasses.dataclass(frozen=True)
class RunKeys:
    """The run level: the pointer to the run's current job, and one job prefix per generation."""

    root: str
    run_id: str

    @functools.cached_property
    def prefix(self) -> str:
        """The run prefix with a trailing slash: every job of the run lies under it."""
        return f"{self.root}/{self.run_id}/"

    def job(self) -> str:
        """The pointer ``{gen}`` naming the run's current job."""
        return self.prefix + "job"

    def generation(self, gen: int) -> Keys:
        return Keys(self.root, self.run_id, gen)

    def generation_of(self, key: str) -> int | None:
        """The generation whose job prefix ``key`` lies under, or None (the pointer, a foreign key)."""
        if not key.startswith(self.prefix):
            return None
        first, slash, _ = key[len(self.prefix):].partition("/")
        if not slash or not _GEN_RE.fullmatch(first) or int(first) < 1 or f"{int(first):0{GEN_DIGITS}d}" != first:
            return None
        return int(first)


@dataclasses.dataclass(frozen=True)
class Keys:
    """The keys of one job: generation ``gen`` (1, 2, ...) of run ``run_id``."""

    root: str
    run_id: str
    gen: int

    def __post_init__(self):
        if type(self.gen) is not int or self.gen < 1:
            raise ValueError(f"a job generation is a positive integer, not {self.gen!r}")

    @property
    def run(self) -> RunKeys:
        return RunKeys(self.root, self.run_id)

    @functools.cached_property
    def prefix(self) -> str:
        """The job prefix with a trailing slash: every key of the job starts with it."""
        return f"{self.run.prefix}{self.gen:0{GEN_DIGITS}d}/"

    def spec(self) -> str:
        return self.prefix + "spec"

    def control(self) -> tuple[str, bytes]:
        """The range ``[start, end)`` that holds exactly the job-wide keys every agent watches: restarts, result,
        round and spec (in lexical order they are adjacent; ``r/`` sorts before ``restarts``)."""
        return self.restarts(), (self.spec() + "\0").encode()

    def nodes(self) -> str:
        return self.prefix + "nodes/"

    def node(self, node: str) -> str:
        return self.nodes() + node

    def node_ranks(self) -> str:
        return self.prefix + "node_ranks/"

    def quarantines(self) -> str:
        return self.prefix + "quarantine/"

    def quarantine(self, node: str) -> str:
        """A node's worker failures (job-wide, kept across its agent's restarts) and its quarantine."""
        return self.quarantines() + node

    def cluster_quarantine(self, node: str) -> str:
        """A node's cluster-wide quarantine record (``cluster_quarantine``), outside the job prefix."""
        return cluster_quarantine(self.root, node)

    def node_rank(self, rank: int) -> str:
        """The claim of group rank ``rank`` by the one live node started with ``--node-rank <rank>``."""
        return f"{self.node_ranks()}{rank}"

    def progresses(self) -> str:
        return self.prefix + "progress/"

    def progress(self, node: str) -> str:
        """The node's latest training step and step rate (``node.steps``, ``coord.progress``)."""
        return self.progresses() + node

    def round(self) -> str:
        return self.prefix + "round"

    def restarts(self) -> str:
        return self.prefix + "restarts"

    def result(self) -> str:
        return self.prefix + "result"

    def rounds(self) -> str:
        return self.prefix + "r/"

    def newest_round(self, names) -> int:
        """The highest round number among the key names ``names`` (keys under ``rounds()``; 1 when none is)."""
        found = []
        for name in names:
            try:
                found.append(self.parse(name).round)
            except BadKeyData:
                continue  # not a key of the schema: it names no round
        return max((r for r in found if r is not None), default=1)

    def round_dir(self, rnd: int) -> str:
        got = self._round_dirs.get(rnd)  # every key of a round is made from it, at every step: made once per round
        if got is None:
            got = self._round_dirs[rnd] = f"{self.rounds()}{rnd:0{ROUND_DIGITS}d}/"
        return got

    @functools.cached_property
    def _round_dirs(self) -> dict[int, str]:
        return {}

    def joins(self, rnd: int) -> str:
        return self.round_dir(rnd) + "join/"

    def join(self, rnd: int, node: str) -> str:
        return self.joins(rnd) + node

    def plan(self, rnd: int) -> str:
        """The plan's header; with its parts it is the range ``plan(rnd)`` .. ``prefix_end(plan(rnd))``."""
        return self.round_dir(rnd) + "plan"

    def plan_part(self, rnd: int, part: int) -> str:
        """Part ``part`` of the plan's members (``plan.py``)."""
        return f"{self.plan(rnd)}/{part}"

    def exits(self, rnd: int) -> str:
        return self.round_dir(rnd) + "exit/"

    def exit(self, rnd: int, node: str) -> str:
        return self.exits(rnd) + node

    def failures(self, rnd: int) -> str:
        return self.round_dir(rnd) + "failures/"

    def failure(self, rnd: int, node: str) -> str:
        return self.failures(rnd) + node

    def store(self, rnd: int) -> str:
        """The prefix of round ``rnd``'s c10d Store: every key the store holds is this prefix plus torch's key."""
        return f"{self.prefix}store/{rnd:0{ROUND_DIGITS}d}/"

    def stores(self) -> str:
        return self.prefix + "store/"

    def parse(self, key: str) -> ParsedKey:
        """Classify a key of this job; raises BadKeyData for anything the schema does not name."""
        if not key.startswith(self.prefix):
            raise BadKeyData(key, f"not under the job prefix {self.prefix}")
        rest = key[len(self.prefix):]
        if rest in ("spec", "round", "restarts", "result"):
            return ParsedKey(rest)
        parts = rest.split("/")
        if len(parts) == 2 and parts[0] == "nodes" and parts[1]:
            return ParsedKey("node", node=parts[1])
        if len(parts) == 2 and parts[0] == "quarantine" and parts[1]:
            return ParsedKey("quarantine", node=parts[1])
        if len(parts) == 2 and parts[0] == "progress" and parts[1]:
            return ParsedKey("progress", node=parts[1])
        if len(parts) == 2 and parts[0] == "node_ranks" and _RANK_RE.fullmatch(parts[1]):
            return ParsedKey("node_rank", rank=int(parts[1]))
        if len(parts) >= 3 and parts[0] == "store" and _ROUND_RE.fullmatch(parts[1]):
            return ParsedKey("store", round=int(parts[1]))  # the rest is torch's key, whatever it is
        if len(parts) >= 3 and parts[0] == "r" and _ROUND_RE.fullmatch(parts[1]):
            rnd = int(parts[1])
            if parts[2:] == ["plan"]:
                return ParsedKey("plan", round=rnd)
            if len(parts) == 4 and parts[2] == "plan" and _RANK_RE.fullmatch(parts[3]):
                return ParsedKey("plan_part", round=rnd, part=int(parts[3]))
            kinds = {"join": "join", "exit": "exit", "failures": "failure"}
            if len(parts) == 4 and parts[2] in kinds and parts[3]:
                return ParsedKey(kinds[parts[2]], round=rnd, node=parts[3])
        raise BadKeyData(key, "not a key of the etcd-agent schema")


def prefix_end(prefix: str) -> bytes:
    """The range end that makes ``[prefix, end)`` cover every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    for i in reversed(range(len(raw))):
        if raw[i] < 0xFF:
            raw[i] += 1
            return bytes(raw[: i + 1])
    return b"\0"


def encode(obj: dict[str, Any]) -> bytes:
    """A value for etcd: compact JSON with the schema version."""
    return json.dumps({**obj, "v": SCHEMA_VERSION}, sort_keys=True, separators=(",", ":")).encode()


def decode(key: str, raw: bytes) -> dict[str, Any]:
    """Parse a value read from ``key``; BadKeyData names the key when it is not a schema-v1 JSON object."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadKeyData(key, f"not JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise BadKeyData(key, "not a JSON object")
    if type(obj.get("v")) is not int or obj["v"] != SCHEMA_VERSION:
        raise BadKeyData(key, f"schema version {obj.get('v')!r}, this agent reads version {SCHEMA_VERSION}")
    return obj
