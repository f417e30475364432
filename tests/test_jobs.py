"""Which job of a run an arriving agent joins (``coord/jobs.py``), against a real etcd: what it reads to decide, and
that a job that never started is joined rather than waited on as abandoned."""

from __future__ import annotations

import time

import pytest

from etcd_agent.config import EtcdConfig, JobSpec
from etcd_agent.coord import jobs, txns
from etcd_agent.endpoints import parse_endpoints
from etcd_agent.errors import SpecMismatch
from etcd_agent.etcd.client import Etcd
from etcd_agent.schema.keys import RunKeys, cluster_quarantine

SPEC = JobSpec(1, 2, "1", 0)


def counted(etcd: Etcd) -> list[str]:
    """The unary calls ``etcd`` makes from now on, by what they do."""
    real, calls = etcd.call, []

    def call(where, *args, **kwargs):
        calls.append(where)
        return real(where, *args, **kwargs)
    etcd.call = call
    return calls


def test_an_agent_arriving_at_a_running_first_job_reads_once_and_keeps_what_it_watches(etcd_endpoint, run_id):
    etcd, run = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint))), RunKeys("/etcd-agent", run_id)
    keys = txns.init_job(etcd, run, SPEC, time.time())
    calls, found = counted(etcd), {}
    cluster = cluster_quarantine(run.root, "n1")
    assert txns.init_job(etcd, run, SPEC, time.time(), found=found, also=[cluster]) == keys
    assert len(calls) == 1, calls  # the nested-run check's txn read everything else
    control, revision = found["control"]
    assert {kv.key for kv in control} == {keys.spec(), keys.round(), keys.restarts()}
    assert found[cluster] == ([], revision), "the cluster quarantine record, read in the same txn"


def test_the_agent_that_starts_a_job_keeps_its_read_back(etcd_endpoint, run_id):
    etcd, run = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint))), RunKeys("/etcd-agent", run_id)
    calls, found = counted(etcd), {}
    keys = txns.init_job(etcd, run, SPEC, time.time(), found=found)
    assert len(calls) == 2, calls  # the check (no job yet) and the start, which reads the new job back
    control, revision = found["control"]
    assert {kv.key for kv in control} == {keys.spec(), keys.round(), keys.restarts()}
    assert all(kv.mod_revision == revision for kv in control)


def test_an_agent_that_loses_the_start_decides_on_what_its_failed_start_read(etcd_endpoint, run_id):
    etcd, run = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint))), RunKeys("/etcd-agent", run_id)
    keys = txns.init_job(etcd, run, SPEC, time.time())
    calls, read, found = counted(etcd), [jobs.Read(None, 1, [], [], 0)], {}  # it read before the job was made
    assert jobs.find_job(etcd, run, SPEC, time.time(), None, None, read, found) is jobs.AGAIN
    assert jobs.find_job(etcd, run, SPEC, time.time(), None, None, read, found) == keys
    assert len(calls) == 1 and calls[0].startswith("start job 1"), calls
    assert {kv.key for kv in found["control"][0]} == {keys.spec(), keys.round(), keys.restarts()}


def test_a_job_that_never_started_is_joined_without_waiting_for_its_registry(etcd_endpoint, run_id):
    etcd, run = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint))), RunKeys("/etcd-agent", run_id)
    keys = txns.init_job(etcd, run, SPEC, time.time())  # made; nobody registered (its maker may be registering now)
    asked = []

    def abandoned(k, first) -> bool:
        asked.append(k)
        return False
    assert txns.init_job(etcd, run, SPEC, time.time(), abandoned) == keys
    assert asked == [], "a job that never started is joined: joining it is starting it"
    other = JobSpec(1, 3, "1", 0)  # a dead job made with other flags is asked about, so these flags can start
    with pytest.raises(SpecMismatch):  # this ``abandoned`` ends nothing
        txns.init_job(etcd, run, other, time.time(), abandoned)
    assert asked == [keys]
    kv, _ = etcd.get(keys.round())
    etcd.put(keys.round(), kv.value)  # the round moved since the job was made (closed, restarted)
    assert txns.init_job(etcd, run, SPEC, time.time(), abandoned) == keys
    assert asked == [keys, keys], "a job that started, with nobody registered, is asked about"
