"""Training progress: beat(step) and its file, the node's step meter, the publisher's bounded puts (against a real
etcd), the job's summary and stragglers, and the no-progress guard's decisions (pure)."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from etcd_agent import logs, progress
from etcd_agent.config import EtcdConfig, JobSpec
from etcd_agent.coord import stall
from etcd_agent.coord.decide import Bump, End, decide
from etcd_agent.coord.progress import MIN_PERIOD, Publisher, period, summarize
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.errors import ConfigError
from etcd_agent.etcd.client import Etcd
from etcd_agent.node.steps import Reading, StepMeter
from etcd_agent.schema.keys import Keys
from etcd_agent.schema.values import Failure, Progress, Restarts

from views import ME, PARAMS, finished_here, running_here, view


PARAMS_20 = dataclasses.replace(PARAMS, max_restarts=20)


@pytest.fixture
def progress_file(tmp_path, monkeypatch):
    path = tmp_path / "progress"
    monkeypatch.setenv(progress.PROGRESS_ENV, str(path))
    monkeypatch.setattr(progress, "_last", 0.0)
    return path


# --- beat(step) and the progress file -------------------------------------------------------------------------

def test_beat_with_a_step_writes_it_as_decimal_text(progress_file):
    progress.beat(1200)
    assert progress_file.read_text() == "1200\n"
    assert progress.read_step(str(progress_file)) == 1200
    assert not (progress_file.parent / "progress.tmp").exists()  # renamed over the file: never half a number


def test_beats_within_half_a_second_write_nothing(progress_file):
    progress.beat(1)
    for step in range(2, 100):  # a fast training loop: the file keeps its first step until the interval passed
        progress.beat(step)
    assert progress.read_step(str(progress_file)) == 1


def test_a_beat_without_a_step_touches_an_empty_file(progress_file):
    progress.beat()
    assert progress_file.exists() and progress_file.read_text() == ""
    assert progress.read_step(str(progress_file)) is None


def test_beat_is_a_no_op_outside_etcd_agent(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    progress.beat(5)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [-1, 1.5, "7", True])
def test_a_step_that_is_not_a_whole_number_is_refused(bad, progress_file):
    with pytest.raises(ValueError, match="whole number"):
        progress.beat(bad)


@pytest.mark.parametrize("content", ["12x\n", "-3", "1.5", "9" * 40])
def test_a_garbled_file_is_no_step(content, tmp_path):
    path = tmp_path / "progress"
    path.write_text(content)
    with pytest.raises(ValueError, match="not a step"):
        progress.read_step(str(path))


def test_a_missing_file_is_no_step(tmp_path):
    assert progress.read_step(str(tmp_path / "none")) is None


def test_a_failure_report_says_its_step_only_when_it_has_one():
    f = Failure(0, 0, 99, 3, None, "boom", time=7.0, round=3, node="a")
    assert b'"step"' not in f.encode()  # a report without a step is stored as before steps existed
    assert Failure.read("k", dataclasses.replace(f, step=1200).encode()).step == 1200


# --- the node's step meter -------------------------------------------------------------------------------------

class Files:
    def __init__(self, tmp_path, n: int):
        self.round, self.paths = 1, [tmp_path / f"p{i}" for i in range(n)]

    def __call__(self):
        return self.round, [str(p) for p in self.paths]


def test_the_node_step_is_the_highest_its_workers_reported(tmp_path):
    files = Files(tmp_path, 3)
    meter = StepMeter(files, logs.get("test"))
    assert meter.step() is None  # no file yet
    files.paths[0].write_text("40")
    files.paths[1].write_text("")  # a beat without a step
    files.paths[2].write_text("42\n")
    assert meter.step() == 42


def test_a_garbled_file_is_warned_about_once_and_ignored(tmp_path, caplog):
    files = Files(tmp_path, 2)
    files.paths[0].write_text("oops")
    files.paths[1].write_text("7")
    meter = StepMeter(files, logs.get("test"))
    with caplog.at_level(logging.WARNING):
        assert [meter.step() for _ in range(3)] == [7, 7, 7]
    assert sum("not a step" in r.getMessage() for r in caplog.records) == 1


def test_the_rate_is_steps_per_second_over_the_window_and_a_new_round_starts_it_again(tmp_path):
    files = Files(tmp_path, 1)
    meter = StepMeter(files, logs.get("test"), window=10.0)
    for t, step in ((0.0, 100), (2.0, 110), (4.0, 120)):
        files.paths[0].write_text(str(step))
        r = meter.sample(now=t)
    assert r == Reading(1, 120, 5.0)
    for t, step in ((20.0, 200), (22.0, 204)):  # the samples older than the window are dropped
        files.paths[0].write_text(str(step))
        r = meter.sample(now=t)
    assert r.rate == pytest.approx(2.0)
    files.round = 2
    files.paths[0].write_text("1")
    assert meter.sample(now=23.0) == Reading(2, 1, 0.0)


# --- the publisher against a real etcd: bounded puts ---------------------------------------------------------

def test_the_publisher_puts_only_a_changed_step_and_at_most_once_per_period(etcd_endpoint, run_id):
    etcd = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
    keys = Keys("/etcd-agent", run_id, 1)
    lease = etcd.client.lease(30).id
    reading = [None]
    pub = Publisher(etcd, keys.progress("n0"), "n0", lambda: lease, lambda: reading[0])
    try:
        assert not pub.tick(100.0, started=0.0)  # no workers with progress files
        reading[0] = Reading(1, None, 0.0, members=3)
        assert not pub.tick(100.0, started=0.0)  # workers, but no step reported yet
        reading[0] = Reading(1, 10, 2.0, members=3)
        assert not pub.tick(MIN_PERIOD - 1, started=0.0)  # within the first period
        assert pub.tick(MIN_PERIOD, started=0.0)
        assert not pub.tick(MIN_PERIOD + 100, started=0.0)  # the same step: no put
        reading[0] = Reading(1, 11, 2.0, members=3)
        assert not pub.tick(2 * MIN_PERIOD - 0.5, started=0.0)  # changed, but the period is not over
        assert pub.tick(2 * MIN_PERIOD + 100, started=0.0)
        assert pub.puts == 2
        kv, _ = etcd.get(keys.progress("n0"))
        assert Progress.from_kv(kv) == Progress("n0", 1, 11, 2.0, Progress.from_kv(kv).time)
        assert kv.lease == lease  # bound to the session: a lost node's step vanishes with it
    finally:
        etcd.client.revoke_lease(lease)
        etcd.close()


def test_the_period_grows_with_the_job_so_that_a_job_writes_a_bounded_rate():
    assert period(1) == period(500) == MIN_PERIOD
    assert period(10_000) == 100.0  # 100 puts per second for the whole job, 0.6 per node per minute
    assert 10_000 / period(10_000) == 100


# --- the job's summary and stragglers --------------------------------------------------------------------------

def test_the_job_step_is_the_range_over_nodes_and_its_rate_the_median():
    recs = [Progress("a", 3, 100, 10.0), Progress("b", 3, 98, 9.5), Progress("c", 3, 60, 4.0),
            Progress("old", 2, 500, 10.0)]
    job = summarize(recs)
    assert (job.round, job.nodes, job.min_step, job.max_step, job.rate, job.stragglers) == (3, 3, 60, 100, 9.5, ())
    assert summarize(recs, threshold=0.2).stragglers == (("c", 4.0),)
    assert summarize(recs, threshold=0.7).stragglers == ()  # 4.0 is not below 9.5 by more than 70%
    assert "stragglers: c (4 steps/s)" in summarize(recs, threshold=0.2).describe()
    assert summarize([]) is None


# --- the no-progress guard (pure) ------------------------------------------------------------------------------

def test_count_keeps_the_best_step_and_how_many_restarts_in_a_row_made_none():
    rs = Restarts(0, 20, stall_limit=3)
    rs = stall.count(rs, 5)
    assert (rs.used, rs.best_step, rs.stalled) == (1, 5, 0)
    for used in (2, 3):
        rs = stall.count(rs, 5)
        assert (rs.used, rs.stalled, stall.exhausted(rs)) == (used, used - 1, False)
    rs = stall.count(rs, None)  # a round that reported no step, once one was reported: no progress either
    assert (rs.used, rs.stalled, stall.exhausted(rs)) == (4, 3, True)
    assert stall.count(rs, 6).stalled == 0  # a new best resets it


def test_the_guard_is_off_until_a_step_is_reported_and_when_not_asked_for():
    rs = Restarts(0, 20, stall_limit=2)
    for _ in range(5):
        rs = stall.count(rs, None)
    assert (rs.used, rs.best_step, rs.stalled, stall.exhausted(rs)) == (5, None, None, False)
    off = Restarts(0, 20)
    for _ in range(5):
        off = stall.count(off, 1)
    assert not stall.exhausted(off) and off == Restarts(5, 20)  # the record an agent without the guard writes


def guarded_view(best: int | None, stalled: int, limit: int = 3, used: int = 3):
    v = view(restarts=(used, 20))
    return dataclasses.replace(v, restarts=dataclasses.replace(v.restarts, stall_limit=limit, best_step=best,
                                                               stalled=stalled))


def crashed(step: int | None):
    f = Failure(0, 0, 99, 3, None, "boom", time=7.0, round=3, node="node-a", step=step)
    return finished_here("failed", f, step=step)


def test_decide_bumps_with_the_counted_budget_while_the_storm_is_below_k():
    a = decide(guarded_view(best=5, stalled=1), crashed(5), PARAMS_20)
    assert isinstance(a, Bump) and a.counted
    assert (a.restarts.used, a.restarts.best_step, a.restarts.stalled) == (4, 5, 2)


def test_decide_ends_the_job_when_k_restarts_in_a_row_made_no_progress():
    a = decide(guarded_view(best=5, stalled=2), crashed(5), PARAMS_20)
    assert isinstance(a, End) and a.phase == "failed"
    assert "3 restarts in a row made no progress beyond step 5 (--max-no-progress-restarts 3" in a.result.reason
    assert a.result.restarts == 3 and a.failure.step == 5


def test_decide_restarts_on_a_new_best_step_and_uses_a_peers_report():
    a = decide(guarded_view(best=5, stalled=2), crashed(9), PARAMS_20)
    assert isinstance(a, Bump) and (a.restarts.best_step, a.restarts.stalled) == (9, 0)
    peer = Failure(1, 0, 98, 3, None, "boom", time=7.0, round=3, node="node-b", step=12)
    v = guarded_view(best=5, stalled=2)
    v = dataclasses.replace(v, failures={"node-b": peer}, joins={ME: v.joins[ME]})  # node-b failed and is gone
    a = decide(v, running_here(), PARAMS_20)  # a survivor without a step of its own: the peer's report counts
    assert isinstance(a, Bump) and (a.restarts.best_step, a.restarts.stalled) == (12, 0)


def test_the_flags_are_checked_with_their_names():
    with pytest.raises(ConfigError, match="--max-no-progress-restarts"):
        JobSpec(1, 1, "1", 0, max_no_progress_restarts=-1)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="--straggler-threshold"):
            JobSpec(1, 1, "1", 0, straggler_threshold=bad)
    assert Restarts.of(JobSpec(1, 1, "1", 20, max_no_progress_restarts=3)) == Restarts(0, 20, stall_limit=3)
    assert Restarts.of(JobSpec(1, 1, "1", 20)).encode() == Restarts(0, 20).encode() == b'{"max":20,"used":0,"v":1}'


# --- the readers: the exporter's model and the events replay's entries -----------------------------------------

def test_the_exporter_model_has_the_step_range_rate_stragglers_and_the_stall_count():
    from etcd_agent.etcd.client import KV
    from etcd_agent.ops.exporter_model import Model, job_view
    from etcd_agent.schema.values import JobPointer, SpecValue

    k = Keys("/etcd-agent", "r1", 1)
    values = {k.run.job(): JobPointer(1), k.spec(): SpecValue(3, 3, "1", 20, 60.0, 0.2),
              k.restarts(): Restarts(2, 20, stall_limit=3, best_step=5, stalled=1),
              k.progress("a"): Progress("a", 2, 100, 20.0), k.progress("b"): Progress("b", 2, 98, 19.0),
              k.progress("c"): Progress("c", 2, 30, 5.0)}
    model = Model("/etcd-agent")
    model.reset("/etcd-agent/", [KV(key, v.encode(), 1, i + 1, 1, 0) for i, (key, v) in enumerate(values.items())], 9)
    v = job_view(model.runs["r1"], 0.0)
    assert (v.step_min, v.step_max, v.steps_per_second, v.stragglers, v.stalled) == (30, 100, 19.0, ("c",), 1)


def test_events_say_each_progress_put_with_the_job_step_and_each_change_of_stragglers():
    from etcd_agent.ops.events import Steps, describe, line

    k = Keys("/etcd-agent", "r1", 1)
    steps, out = Steps(0.2), []
    for rev, p in enumerate((Progress("a", 1, 100, 20.0), Progress("b", 1, 99, 20.0), Progress("c", 1, 20, 4.0),
                             Progress("c", 1, 90, 19.0)), start=10):
        entry = {**describe("progress", k.parse(k.progress(p.node)), p, True), "revision": rev, "time": None}
        extra = steps.take(p, entry)
        out += [line(entry)] + ([line(extra)] if extra else [])
    assert "job: step 20-100 (20 steps/s, median of 3 node(s)); stragglers: c (4 steps/s)" in out[2]
    assert "round 1: c (4 steps/s) (median 20 steps/s, --straggler-threshold 0.2)" in out[3]
    assert out[-1].split()[2:4] == ["stragglers", "-"] and "no straggler any more" in out[-1]
    assert len(out) == 6  # a put that leaves the set of stragglers as it was adds no entry


# --- the two flags on the command line -------------------------------------------------------------------------

def test_the_flags_reach_the_spec_from_the_command_line_and_rdzv_conf(tmp_path, monkeypatch):
    from test_cli import error, launch

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('hello')\n")
    got = launch("--max-no-progress-restarts", "3", "--straggler-threshold", "0.2", "train.py")
    assert (got.cfg.spec.max_no_progress_restarts, got.cfg.spec.straggler_threshold) == (3, 0.2)
    got = launch("--rdzv-conf", "max_no_progress_restarts=2,straggler_threshold=0.5", "train.py")
    assert (got.cfg.spec.max_no_progress_restarts, got.cfg.spec.straggler_threshold) == (2, 0.5)
    assert "--straggler-threshold" in error("--straggler-threshold", "1.5", "train.py")
    assert "--max-no-progress-restarts" in error("--max-no-progress-restarts", "-1", "train.py")
    assert "a fraction from 0 to below 1" in error("--rdzv-conf", "straggler_threshold=2", "train.py")
