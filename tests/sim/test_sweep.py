"""Sweeps: the cartesian product, parallel points, and throughput at a latency target."""
import pytest

from pensieve.config import ScenarioError, expand_sweep, parse_scenario
from sim import sweep

from .helpers import AffineCost

BASE = {
    "name": "sw",
    "model": "smollm2-135m",
    "cache": {"device_gb": 0.4, "host_gb": 0.4},
    "workload": {"type": "synthetic", "conversations": 20, "arrival_rate": 0.5, "think_time_s": 5},
    "sweep": {"cache.policy": ["pensieve", "lru"], "workload.arrival_rate": [0.5, 1.0, 2.0]},
}


@pytest.fixture(autouse=True)
def affine_cost(monkeypatch):
    monkeypatch.setattr(sweep, "build_cost_model", lambda scenario, source: AffineCost())


def test_sweep_is_a_validated_cartesian_product():
    points = expand_sweep(parse_scenario(BASE))
    assert len(points) == 6
    assert [p for p, _ in points][:2] == [{"cache.policy": "pensieve", "workload.arrival_rate": 0.5},
                                          {"cache.policy": "pensieve", "workload.arrival_rate": 1.0}]
    assert points[4][1].cache.policy.type == "lru" and points[4][1].workload.arrival_rate == 1.0
    with pytest.raises(ScenarioError, match="cache.policy.type"):
        expand_sweep(parse_scenario({**BASE, "sweep": {"cache.policy": ["nope"]}}))


def test_points_run_in_processes_and_in_order():
    points = expand_sweep(parse_scenario({**BASE, "sweep": {"cache.policy": ["pensieve", "stateless"]}}))
    serial = sweep.run_points(points, "<t>", jobs=1)
    assert [r["policy"] for r in serial] == ["pensieve", "stateless"]
    assert serial[1]["recomputed_fraction"] == 1.0 and serial[0]["recomputed_fraction"] < 1.0


def test_throughput_at_target_brackets_and_bisects():
    busy = {**BASE, "workload": {**BASE["workload"], "conversations": 60, "think_time": "none"}, "sweep": {}}
    scenario = parse_scenario(busy)
    loose = sweep.throughput_at_target(scenario, "<t>", target_ms=1e9, iterations=2)
    assert loose["best"] is not None and all(row["passes"] for row in loose["tried"])
    found = sweep.throughput_at_target(scenario, "<t>", target_ms=10.0, iterations=3)
    best = found["best"]
    assert best is not None and best["norm_latency_mean_ms"] <= 10.0
    failing = [row for row in found["tried"] if not row["passes"]]
    assert failing and min(row["arrival_rate"] for row in failing) > best["arrival_rate"]
