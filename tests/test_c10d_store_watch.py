"""The c10d Store on etcd v3 (``EtcdStore``) at scale and under deletes: waits share one watch stream, 1000 keys
in one multi-get, wait and check (past etcd's --max-txn-ops), a multi-get reads one revision, values past etcd's
request limit, and a key deleted by someone else ends waits (and torch's exit barrier) at once."""

from __future__ import annotations

import datetime
import threading
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from agents import poll_until  # noqa: E402
from etcd_agent.torch.store import EtcdStore  # noqa: E402
from etcd_agent.config import EtcdConfig  # noqa: E402
from etcd_agent.endpoints import parse_endpoints  # noqa: E402
from etcd_agent.etcd.client import Etcd  # noqa: E402
from etcd_agent.schema.keys import prefix_end  # noqa: E402

pytest.register_assert_rewrite("c10d_stores")  # a plugin (pytest_plugins): marked before its first import
from c10d_stores import SECOND  # noqa: E402

pytest_plugins = ("c10d_stores",)  # the fixtures prefix and store
pytestmark = pytest.mark.torch


def test_waits_share_one_watch_stream(store, etcd_endpoint, prefix):
    """Many concurrent waits on one store: all are woken, through one stream (no thread per wait)."""
    done = []
    threads = [threading.Thread(target=lambda i=i: done.append(store.get(f"k{i}"))) for i in range(8)]
    for t in threads:
        t.start()
    poll_until(lambda: len(store._waiters) == 8, 60, "the 8 waiters to watch their keys")
    assert len([t for t in threading.enumerate() if t.name.startswith("store-watch")]) == 1
    etcd = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
    try:
        for i in range(8):
            etcd.put(f"{prefix}k{i}", b"v")
        for t in threads:
            t.join(60)
        assert sorted(done) == [b"v"] * 8
        assert etcd.count_range(prefix, prefix_end(prefix)) == 8
    finally:
        etcd.close()


MANY = 1000  # well past etcd's default --max-txn-ops (128), which the session etcd keeps


def test_multi_get_wait_and_check_of_1000_keys(store, etcd_endpoint, prefix):
    """torch's agent on group rank 0 reads every node's role info in one multi_get: 1000 keys read, checked and
    waited for, though one etcd txn takes at most 128 operations."""
    keys = [f"torchelastic/role_info/{i}" for i in range(MANY)]
    store.multi_set(keys[:MANY // 2], [f"v{i}" for i in range(MANY // 2)])
    assert not store.check(keys)
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(store.multi_get(keys)))
    waiter.start()
    poll_until(lambda: len(store._waiters) == MANY // 2, 30, "the waiter to watch the 500 missing keys")
    other = EtcdStore(etcd_endpoint, prefix)
    try:
        other.multi_set(keys[MANY // 2:], [f"v{i}" for i in range(MANY // 2, MANY)])
        waiter.join(30)
        assert got == [[f"v{i}".encode() for i in range(MANY)]]
        assert store.check(keys)
        store.wait(keys, SECOND)
        assert store.multi_get(keys) == got[0]
    finally:
        other.close()


def _pair_writer(store: EtcdStore, stop: threading.Event, written: list) -> None:
    """Rewrites keys i and i + MANY/2 together, 64 pairs per txn (one multi_set within 128 operations), with a
    counter that grows: in any one revision of etcd, key i and key i + MANY/2 hold the same value."""
    half, n = MANY // 2, 0
    while not stop.is_set():
        for start in range(0, half, 64):
            n += 1
            idx = range(start, min(start + 64, half))
            store.multi_set([f"k{i}" for i in idx] + [f"k{i + half}" for i in idx], [str(n)] * (2 * len(idx)))
        written.append(n)


def test_multi_get_of_many_keys_reads_one_revision(store, etcd_endpoint, prefix):
    """A multi_get split over several txns reads them all at the first one's revision: a writer that keeps changing
    pairs of keys that land in different txns of the read never shows through as a pair that disagrees."""
    half = MANY // 2
    keys = [f"k{i}" for i in range(MANY)]
    store.multi_set(keys, ["0"] * MANY)
    writer_store = EtcdStore(etcd_endpoint, prefix)
    stop, written = threading.Event(), []
    writer = threading.Thread(target=_pair_writer, args=(writer_store, stop, written))
    writer.start()
    try:
        poll_until(lambda: written, 30, "the writer to rewrite every pair once")
        reads = [store.multi_get(keys) for _ in range(30)]
    finally:
        stop.set()
        writer.join(30)
        writer_store.close()
    assert len({tuple(r) for r in reads}) > 1, "the writer changed nothing while the reads ran"
    for values in reads:
        torn = [i for i in range(half) if values[i] != values[i + half]]
        assert not torn, f"a mixed read: k{torn[0]}={values[torn[0]]!r}, k{torn[0] + half}={values[torn[0] + half]!r}"


def test_values_past_etcds_request_limit(store):
    """etcd takes at most 1.5 MiB per request (--max-request-bytes): multi_set splits by bytes as well as by
    operations, and one value past the limit is refused naming the key and the limit."""
    keys = [f"big{i}" for i in range(4)]
    values = [bytes([i]) * (700 * 1024) for i in range(4)]  # 2.8 MiB in all
    store.multi_set(keys, values)
    assert store.multi_get(keys) == values
    too_large = r"set huge: .*(request is too large|larger than max).*--max-request-bytes"
    with pytest.raises(dist.DistStoreError, match=too_large):
        store.set("huge", b"x" * (2 * 1024 * 1024))


def _wait_in_thread(store: EtcdStore, keys: list[str], out: dict) -> threading.Thread:
    def run():
        try:
            out["value"] = store.multi_get(keys)
        except dist.DistStoreError as exc:
            out["error"] = str(exc)
    t = threading.Thread(target=run)
    t.start()
    return t


def test_a_key_deleted_by_someone_else_ends_waits_at_once(store, etcd_endpoint, prefix):
    """A key of the store deleted from outside (etcdctl del, a cleanup) ends a wait in progress at once, naming
    the key, and every later wait of that store that has to wait; keys that are there are still read. The waits'
    timeout (600 s) is far past the test's: a wait that ended at all, saying why, was ended by the delete."""
    store.set("torchelastic/x/num_members", "1")
    store.set_timeout(datetime.timedelta(seconds=600))
    out: dict = {}
    waiter = _wait_in_thread(store, ["torchelastic/x/last_member"], out)
    poll_until(lambda: store._waiters, 60, "the waiter to watch its key")
    etcd = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
    try:
        etcd.delete_range(prefix + "torchelastic/x/num_members")
        waiter.join(90)
    finally:
        etcd.close()
    assert not waiter.is_alive(), "the wait went on after its key was deleted"
    assert ("wait for torchelastic/x/last_member: the store's key torchelastic/x/num_members was deleted at "
            "revision") in out["error"]
    assert "cannot complete after that" in out["error"]
    with pytest.raises(dist.DistStoreError, match="torchelastic/x/num_members was deleted"):
        store.wait(["later"])
    store.set("there", "v")
    assert store.get("there") == b"v"


def test_a_store_deleting_its_own_key_ends_no_wait(store):
    """delete_key through the store itself is TCPStore's delete: its waits go on."""
    store.set("a", "1")
    out: dict = {}
    waiter = _wait_in_thread(store, ["b"], out)
    poll_until(lambda: store._waiters, 60, "the waiter to watch its key")
    assert store.delete_key("a") and not store.delete_key("a")
    store.set("b", "2")
    waiter.join(60)
    assert out.get("value") == [b"2"], out


def test_deleted_keys_end_torchs_exit_barrier_at_once(etcd_endpoint, prefix, caplog):
    """The probe: torch's agents wait in their exit barrier (torch's ``_exit_barrier``: ``add`` to a counter, then
    wait for the last member's key) when a user or a cleanup deletes the round's store keys. Each agent's barrier
    ends within seconds, torch's agent logging the error (naming a deleted key) and going on, as it does when its
    c10d store goes away; an agent that reaches the barrier after the delete (its count starts over, so the last
    member's key never comes) ends at once too. Before, each sat out the whole 300 s barrier timeout."""
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent

    world = 3
    stores = [EtcdStore(etcd_endpoint, prefix, datetime.timedelta(seconds=300)) for _ in range(world)]
    agents = [SimpleNamespace(_store=s, _worker_group=SimpleNamespace(group_world_size=world, state="SUCCEEDED"),
                              _exit_barrier_timeout=300, _in_exit_barrier=False) for s in stores]
    ended: list[int] = []  # the ranks whose barrier returned (the barrier's 300 s are far past the test's timeout)

    def exit_barrier(rank: int) -> None:
        SimpleElasticAgent._exit_barrier(agents[rank])  # logs what ended the barrier and returns, as in torch
        ended.append(rank)

    try:
        for rank, s in enumerate(stores):  # the round used its store before the barrier (rank assignment)
            s.set(f"torchelastic/role_info/{rank}", b"info")
        early = [threading.Thread(target=exit_barrier, args=(r,)) for r in range(2)]
        for t in early:
            t.start()
        poll_until(lambda: all(s._waiters for s in stores[:2]), 30, "agents 0 and 1 to wait in the barrier")
        etcd = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
        try:
            assert etcd.delete_range(prefix, prefix_end(prefix)) >= 3  # etcdctl del --prefix P/store/<round>/
        finally:
            etcd.close()
        for t in early:
            t.join(90)
        exit_barrier(2)
    finally:
        for s in stores:
            s.close()
    assert sorted(ended) == [0, 1, 2], ended
    errors = [r for r in caplog.records if "Error waiting on exit barrier" in r.getMessage()]
    assert len(errors) == 3
    assert all("torchelastic/agent/terminal_state/num_members was deleted" in str(r.exc_info[1]) for r in errors)
