"""What the test_c10d_store*.py modules share: an ``EtcdStore`` on the session etcd under a prefix of its own.

A pytest plugin (each module names it in ``pytest_plugins``, after ``pytest.importorskip("torch")``) for the fixtures
``prefix`` and ``store``."""

from __future__ import annotations

import datetime

import pytest

from etcd_agent.torch.store import EtcdStore

SECOND = datetime.timedelta(seconds=1)


@pytest.fixture
def prefix(run_id) -> str:
    return f"/store-test/{run_id}/"


@pytest.fixture
def store(etcd_endpoint, prefix):
    s = EtcdStore(etcd_endpoint, prefix, datetime.timedelta(seconds=5))
    yield s
    s.close()
