"""The c10d Store on etcd v3 (``EtcdStore``) against the real etcd: the whole API, TCPStore's semantics (the same
calls give the same answers on both), concurrent ``add`` from several processes, ``wait`` by watch and its
timeouts, gloo process groups on it, and torch's elastic agent's rank assignment and exit barrier through it."""

from __future__ import annotations

import datetime
import multiprocessing
import threading
from collections import namedtuple

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from agents import poll_until  # noqa: E402
from etcd_agent.torch.store import EtcdStore  # noqa: E402
from etcd_agent.config import EtcdConfig  # noqa: E402
from etcd_agent.endpoints import parse_endpoints  # noqa: E402
from etcd_agent.etcd.client import Etcd  # noqa: E402

pytest.register_assert_rewrite("c10d_stores")  # a plugin (pytest_plugins): marked before its first import
from c10d_stores import SECOND  # noqa: E402

pytest_plugins = ("c10d_stores",)  # the fixtures prefix and store
pytestmark = pytest.mark.torch


@pytest.fixture
def tcp_store():
    s = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=5))
    yield s
    del s


def script(s) -> list:
    """One sequence of calls; every answer it collects must be the same on TCPStore and on EtcdStore."""
    out = []
    out.append(("num_keys empty", s.num_keys()))
    s.set("a", "1")
    s.set("b", b"\x00\xffbytes")
    out.append(("get", s.get("a"), s.get("b")))
    out.append(("add new", s.add("counter", 5), s.add("counter", -2), s.add("counter", 0), s.get("counter")))
    out.append(("cs missing, expected empty", s.compare_set("c1", "", "new"), s.get("c1")))
    out.append(("cs missing, expected set", s.compare_set("c2", "old", "new"), s.check(["c2"])))
    out.append(("cs mismatch", s.compare_set("a", "zz", "new"), s.get("a")))
    out.append(("cs match", s.compare_set("a", "1", "2"), s.get("a")))
    s.append("a", "xy")
    s.append("fresh", "v")
    out.append(("append", s.get("a"), s.get("fresh")))
    out.append(("check", s.check(["a", "b"]), s.check(["a", "missing"])))
    s.multi_set(["m1", "m2"], ["x", b"y"])
    out.append(("multi_get", s.multi_get(["m1", "m2", "a"])))
    out.append(("num_keys", s.num_keys()))
    out.append(("delete", s.delete_key("a"), s.delete_key("a"), s.check(["a"])))
    out.append(("num_keys after delete", s.num_keys()))
    out.append(("list_keys", sorted(s.list_keys())))
    try:
        s.wait(["never"], datetime.timedelta(milliseconds=200))
        out.append(("wait timeout", "no error"))
    except dist.DistStoreError:
        out.append(("wait timeout", "DistStoreError"))
    old = s.timeout
    s.set_timeout(datetime.timedelta(milliseconds=300))
    out.append(("timeout", s.timeout))
    try:
        s.get("never")
        out.append(("get timeout", "no error"))
    except dist.DistStoreError:
        out.append(("get timeout", "DistStoreError"))
    s.set_timeout(old)
    return out


def test_answers_match_tcpstore(store, tcp_store):
    assert script(store) == script(tcp_store)


def test_keys_are_plain_etcd_keys(store, etcd_endpoint, prefix):
    store.set("torchelastic/role_info/0", b"\x80payload")
    store.add("n", 3)
    etcd = Etcd(EtcdConfig(parse_endpoints(etcd_endpoint)))
    try:
        kvs, _ = etcd.get_prefix(prefix)
        assert {kv.key: kv.value for kv in kvs} == {prefix + "n": b"3",
                                                    prefix + "torchelastic/role_info/0": b"\x80payload"}
    finally:
        etcd.close()


def test_prefix_store_over_it(store):
    p = dist.PrefixStore("job", store)
    p.set("k", "v")
    assert p.get("k") == b"v"
    assert store.get("job/k") == b"v"
    assert p.add("n", 2) == 2
    assert p.check(["k", "n"]) and not p.check(["nope"])
    assert p.compare_set("k", "v", "w") == b"w"
    p.multi_set(["x", "y"], ["1", "2"])
    assert p.multi_get(["x", "y"]) == [b"1", b"2"]
    p.wait(["x"], SECOND)
    p.set_timeout(datetime.timedelta(milliseconds=200))  # reaches the inner store's timeout, read at each get
    with pytest.raises(dist.DistStoreError):
        p.get("missing")


def test_wait_is_woken_by_a_write_from_elsewhere(store, etcd_endpoint, prefix):
    """A wait for two keys, one written already, watches the other and returns once another store writes it (the
    watch wakes it): the order of what happened is the check; the wait's timeout is far past the test's."""
    other = EtcdStore(etcd_endpoint, prefix)
    happened: list[str] = []

    def writer():
        poll_until(lambda: len(store._waiters) == 1, 60, "the waiter to watch the missing key")
        happened.append("later written")
        other.set("later", "w")

    try:
        other.set("late", "v")
        store.set_timeout(datetime.timedelta(seconds=600))
        threading.Thread(target=writer, daemon=True).start()
        store.wait(["late", "later"])
        happened.append("wait returned")
        assert happened == ["later written", "wait returned"]
        assert store.multi_get(["late", "later"]) == [b"v", b"w"]
        threading.Timer(0.2, lambda: other.set("got", "x")).start()
        assert store.get("got") == b"x"
    finally:
        other.close()


def test_wait_timeouts_name_the_missing_keys(store):
    store.set("there", "1")
    with pytest.raises(dist.DistStoreError, match=r"wait timeout after 300ms, keys: missing"):
        store.wait(["there", "missing"], datetime.timedelta(milliseconds=300))
    store.set_timeout(datetime.timedelta(milliseconds=200))
    with pytest.raises(dist.DistStoreError, match="missing"):
        store.multi_get(["there", "missing"])


def test_zero_timeout_waits_without_limit(store, etcd_endpoint, prefix):
    store.set_timeout(datetime.timedelta(0))
    other = EtcdStore(etcd_endpoint, prefix)
    try:
        threading.Timer(0.3, lambda: other.set("k", "v")).start()
        assert store.get("k") == b"v"
    finally:
        other.close()


def test_close_ends_waits(store):
    errors = []

    def waiter():
        try:
            store.wait(["never"], datetime.timedelta(seconds=30))
        except dist.DistStoreError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=waiter)
    t.start()
    poll_until(lambda: store._waiters, 60, "the waiter to watch its key")
    store.close("the job ended")
    t.join(60)
    assert not t.is_alive()
    assert errors and "the job ended" in errors[0]
    with pytest.raises(dist.DistStoreError, match="the job ended"):
        store.set("k", "v")


def test_add_on_a_value_that_is_not_a_number(store):
    store.set("word", "hello")
    with pytest.raises(dist.DistStoreError, match="not an integer"):
        store.add("word", 1)


def test_bad_prefix_is_refused(etcd_endpoint):
    with pytest.raises(ValueError, match="must start and end with '/'"):
        EtcdStore(etcd_endpoint, "no/slash")


def test_an_unreachable_etcd_is_a_store_error():
    cfg = EtcdConfig(parse_endpoints("127.0.0.1:1"), connect_timeout=0.5, request_timeout=0.2)
    s = EtcdStore(cfg, "/x/")
    try:
        with pytest.raises(dist.DistStoreError, match="etcd store /x/: set k"):
            s.set("k", "v")
    finally:
        s.close()


def _adder(endpoint: str, prefix: str, count: int, results) -> None:
    s = EtcdStore(endpoint, prefix)
    got = [s.add("counter", 1) for _ in range(count)]
    results.put(got)
    s.close()


def test_concurrent_add_from_several_processes(etcd_endpoint, prefix, store):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_adder, args=(etcd_endpoint, prefix, 25, results)) for _ in range(4)]
    for p in procs:
        p.start()
    seen = []
    for _ in procs:
        seen += results.get(timeout=60)
    for p in procs:
        p.join(30)
    assert store.get("counter") == b"100"
    assert sorted(seen) == list(range(1, 101))  # every add returned a value of its own: none was lost


def _gloo_rank(endpoint: str, prefix: str, rank: int, world: int, results) -> None:
    s = EtcdStore(endpoint, prefix, datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=s, rank=rank, world_size=world)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    dist.barrier()
    results.put((rank, t.item()))
    dist.destroy_process_group()
    s.close()


def test_gloo_process_group_on_the_store(etcd_endpoint, prefix):
    world = 3
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(etcd_endpoint, prefix, r, world, results)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=90) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert got == {0: 6.0, 1: 6.0, 2: 6.0}


Spec = namedtuple("Spec", "role local_world_size")


def test_torch_agent_rank_assignment_and_exit_barrier(etcd_endpoint, prefix):
    """torch's own code paths, run against the store as torch's elastic agent runs them: worker rank assignment
    (role info, rank 0's multi_get/multi_set, the others' get) and the exit barrier (add, then wait)."""
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent
    from torch.distributed.elastic.utils import store as store_util

    sizes = [2, 1, 3]
    out: dict[int, list] = {}
    errors = []

    def node(group_rank: int) -> None:
        s = EtcdStore(etcd_endpoint, prefix, datetime.timedelta(seconds=30))
        try:
            workers = SimpleElasticAgent._assign_worker_ranks(None, s, group_rank, len(sizes),
                                                              Spec("trainer", sizes[group_rank]))
            out[group_rank] = [(w.global_rank, w.world_size, w.role_rank) for w in workers]
            store_util.barrier(s, len(sizes), key_prefix="torchelastic/agent/terminal_state", barrier_timeout=30)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=node, args=(r,)) for r in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert out == {0: [(0, 6, 0), (1, 6, 1)], 1: [(2, 6, 2)], 2: [(3, 6, 3), (4, 6, 4), (5, 6, 5)]}
    check = EtcdStore(etcd_endpoint, prefix)
    try:
        assert check.get("torchelastic/agent/terminal_state/num_members") == b"3"
        assert check.check(["torchelastic/agent/terminal_state/last_member"])
    finally:
        check.close()
