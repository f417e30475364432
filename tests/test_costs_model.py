"""The arithmetic of the 10,000-node model (tools/bench/costs_model.py, docs/scale-model.md) and of costs.py's mix of
measured cases into unit costs, on fixed inputs: what the document's formulas say, nothing measured."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
import costs  # noqa: E402
import costs_model as cm  # noqa: E402


def unit(cpu: float, leader: float, sent: float, received: float) -> dict:
    return {"cpu": cpu, "leader": leader, "sent": sent, "received": received}


UNIT = {"keepalive": unit(100e-6, 50e-6, 40, 10), "progress": unit(50e-6, 20e-6, 40, 2),
        "txn": unit(1e-3, 400e-6, 350, 400), "event": unit(10e-6, 4e-6, 300, 0),
        "join_fixed": unit(1.5e-3, 600e-6, 700, 450), "join_key": unit(2e-6, 1e-6, 0, 0),
        "read_fixed": unit(200e-6, 80e-6, 100, 30), "read_kb": unit(2e-6, 1e-6, 1024, 0)}


def test_steady_load_is_agents_times_rates_times_unit_costs():
    s = cm.steady(UNIT, 10_000, keepalive_rate=0.5, progress_rate=0.25)
    assert s["requests_per_agent_s"] == 0.75
    assert s["keepalives_s"] == 5000 and s["progress_s"] == 2500 and s["requests_s"] == 7500
    assert s["cpu_cores"] == pytest.approx(10_000 * (0.5 * 100e-6 + 0.25 * 50e-6))  # 0.625
    assert s["leader_cores"] == pytest.approx(10_000 * (0.5 * 50e-6 + 0.25 * 20e-6))  # 0.3
    assert s["sent_bytes_s"] == pytest.approx(10_000 * (0.5 * 40 + 0.25 * 40))


def test_a_round_today_reads_the_whole_plan_and_after_the_split_a_bounded_part():
    n = 1000
    today = cm.round_load(UNIT, n, dataclasses.replace(cm.TODAY, txns=2.0, small_reads=2.0))
    assert (today["joins"], today["txns"], today["events"], today["reads"]) == (1000, 2000, 5000, 3000)
    assert today["join_keys_scanned"] == n * n / 2  # the k-th joiner's sorted range reads k join keys
    assert today["plan_read_bytes"] == 30 * n  # O(N) per member, O(N^2) per round
    kb = n * 30 * n / 1024
    joins = n * (1.5e-3 + n / 2 * 2e-6)
    assert today["cpu_s"] == pytest.approx(joins + 2000 * 1e-3 + 5000 * 10e-6 + 3000 * 200e-6 + kb * 2e-6)
    assert today["sent_mb"] == pytest.approx((n * 700 + 2000 * 350 + 5000 * 300 + 3000 * 100 + kb * 1024) / 1e6)
    assert cm.round_load(UNIT, n)["reads"] == 2 * n  # the plan and one more read, as measured
    split = cm.round_load(UNIT, n, cm.SPLIT)
    assert split["plan_read_bytes"] == 64 * 70 + 500  # whatever N
    assert cm.round_load(UNIT, 10 * n, cm.SPLIT)["read_mb"] == pytest.approx(10 * split["read_mb"])  # O(N)
    assert cm.round_load(UNIT, 10 * n, cm.TODAY)["read_mb"] == pytest.approx(100 * today["read_mb"])  # O(N^2)
    assert cm.round_load(UNIT, n, cm.BOUNDED)["join_keys_scanned"] == 16 * n
    assert cm.round_load(UNIT, n, cm.TODAY, members=3)["scan_s_per_member"] == pytest.approx(n * n / 2 * 2e-6 / 3)


def test_the_exit_barrier_reads_back_half_the_exits_on_average():
    end = cm.job_end(UNIT, 1000)
    assert end["keys_read"] == 500_000
    assert end["cpu_s"] == pytest.approx(1000 * 1e-3 + 500_000 * 2e-6)
    assert end["sent_mb"] == pytest.approx(500_000 * cm.EXIT_KV_BYTES / 1e6)


def test_derive_uses_todays_timings_and_a_budget_of_one_request_per_agent():
    model = cm.derive(UNIT, n=10_000, ttls=(5, 10), members=3)
    for ttl in (5, 10):
        assert model["steady"][ttl] == cm.steady(UNIT, 10_000, *cm.today_rates(ttl, 3))
        budget = model["budget"][ttl]
        assert budget["requests_per_agent_s"] == pytest.approx(1.0)
        assert budget["keepalives_s"] == pytest.approx(10_000 * 3 / ttl)  # a keepalive every TTL/3
    assert model["round"]["split"]["read_mb"] < model["round"]["today"]["read_mb"] / 50
    assert "| 10 s | budget | 1.00 |" in cm.model_markdown(model)


def test_sizing_formulas():
    assert cm.mass_loss_s(10_000, 10) == 20.0  # the TTL, then 1000 revokes a second
    assert cm.memory_gb(10_000, 50_000) == 0.5
    assert cm.rounds_retained(10_000) == pytest.approx(100_000 / 10_005)


def test_mix_weighs_leader_and_follower_cases_by_a_random_member_choice():
    def case(cpu):
        return {"cpu": cpu, "leader": cpu / 2, "sent": cpu * 1e6, "received": 1.0}
    names = ("keepalive", "txn", "progress", "put", "watch-100", "range-1k", "range-100k", "join-100", "join-1000",
             "join-4000")
    res = {f"{name}@leader": case(300e-6) for name in names}
    res.update({f"{name}@follower": case(600e-6) for name in names})
    res["watch-100@leader"] = case(300e-6 + 100 * 10e-6)
    res["watch-100@follower"] = case(600e-6 + 100 * 10e-6)
    res["range-100k@leader"] = case(300e-6 + 99 * 2e-6)
    res["range-100k@follower"] = case(600e-6 + 99 * 2e-6)
    res["join-4000@leader"] = case(300e-6 + 3000 * 2e-6)
    res["join-4000@follower"] = case(600e-6 + 3000 * 2e-6)
    u = costs.mix(res, 3)
    assert u["keepalive"]["cpu"] == pytest.approx((300e-6 + 2 * 600e-6) / 3)  # 1/3 on the leader, 2/3 on followers
    assert u["event"]["cpu"] == pytest.approx(10e-6)  # (watch-100 - put) / 100
    assert u["read_kb"]["cpu"] == pytest.approx(2e-6)  # (range-100k - range-1k) / 99
    assert u["read_fixed"]["cpu"] == pytest.approx(500e-6 - 2e-6)  # range-1k less one KB
    assert u["join_key"]["cpu"] == pytest.approx(2e-6)  # (join-4000 - join-1000) / 3000
    assert u["join_fixed"]["cpu"] == pytest.approx(500e-6 - 100 * 2e-6)  # join-100 less its 100 keys
    assert set(u) == set(cm.KINDS)
