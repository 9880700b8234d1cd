"""End-to-end validation on the real SmolLM2 and the shipped CPU profile: the machinery, not the fidelity.

The fidelity figures come from scenarios/validate/ run on a quiet machine; here the checks are that
both sides ran the same workload down every cache path, wrote their files, and agree exactly on what
does not depend on time.
"""
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from pensieve.cli import main  # noqa: E402

SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "validate" / "ci-small.yaml"


def test_validate_runs_both_sides_and_reports(tmp_path):
    out = tmp_path / "v"
    # the machinery, not the fidelity: a gate of 1000% passes whatever this machine's speed
    assert main(["validate", str(SCENARIO), "--quiet", "--out", str(out), "--max-error", "10", "--repeats", "2"]) == 0
    result = json.loads((out / "validation.json").read_text())
    assert result["real"]["requests"] == result["sim"]["requests"] > 0
    assert result["real"]["tokens"]["generated"] == result["sim"]["tokens"]["generated"]
    rows = {r["metric"]: r for r in result["comparison"]}
    for side in ("real", "sim"):  # both sides went down every cache path (hit rates follow the clock)
        summary = result[side]
        assert summary["swap_bytes"]["in"] > 0 and summary["swap_bytes"]["out"] > 0, side
        assert summary["dropped_chunks"] > 0 and summary["tokens"]["recomputed"] > 0, side
        assert summary["suspensions"] > 0, side
    assert result["replay"]["steps"] == result["real"]["steps"] > 0
    for name in ("validation_errors.png", "step_time_replay.png", "real/summary.json", "real/outputs.jsonl",
                 "real/steps.jsonl", "sim/summary.json"):
        assert (out / name).stat().st_size > 0
    speed = result["machine_speed"]
    assert 0.2 < speed["factor"] < 5 and set(speed["before"]["points"]) == set(speed["after"]["points"])
    assert speed["factor"] == pytest.approx((speed["before"]["factor"] + speed["after"]["factor"]) / 2)
    assert result["verdict"]["max_error"] == 10 and result["verdict"]["passes"]
    spread = {r["metric"]: r for r in result["real_spread"]}
    assert spread["throughput (req/s)"]["runs"] == 2 and spread["throughput (req/s)"]["spread"] >= 0
    assert spread["output tokens/s"]["values"][0] == result["real"]["output_tokens_per_s"]
    assert {v["verdict"] for v in result["metric_verdicts"]} <= {
        "within target", "within the real runs' spread", "neither", "no target"}
    opened = result["open_loop"]
    assert opened["sim"]["requests"] == result["real"]["requests"]
    assert opened["machine_speed_factor"] == result["machine_speed"]["factor"]
    real2 = json.loads((out / "real-2" / "summary.json").read_text())
    assert real2["requests"] == result["real"]["requests"]  # the same workload, run again
    assert sum(row["requests_real"] for row in result["per_turn"]) == result["real"]["requests"]
    assert [row["turn"] for row in result["per_turn"]][:2] == [0, 1]
    assert sum(part["steps"] for part in result["replay"]["by_kind"].values()) == result["replay"]["steps"]
    assert result["replay"]["by_kind"]["with swaps"]["steps"] > 0
    assert result["real"]["arrival_read_late_s"]["max"] >= 0
    adjusted = {r["metric"]: r for r in result["comparison_at_machine_speed"]}
    assert adjusted.keys() == rows.keys()
    # the scaled clock changes times, not the work asked for
    assert result["sim_at_machine_speed"]["tokens"]["generated"] == result["sim"]["tokens"]["generated"]


def test_ctrl_c_during_the_real_run_keeps_it_and_compares_nothing(tmp_path, monkeypatch):
    from tests.executor.interrupt import press_ctrl_c_after

    press_ctrl_c_after(monkeypatch, steps=40)
    out = tmp_path / "v"
    assert main(["validate", str(SCENARIO), "--quiet", "--no-speed-probe", "--out", str(out)]) == 130
    result = json.loads((out / "validation.json").read_text())
    assert result["interrupted"] and "comparison" not in result
    real = json.loads((out / "real" / "summary.json").read_text())
    assert real["interrupted"] and real["requests"] == result["real"]["requests"]
    assert not (out / "sim").exists()


def test_the_gate_fails_loudly_and_says_how_the_machine_stood():
    from sim.validate import speed_warnings, verdict

    rows = [{"metric": "throughput (req/s)", "kind": "relative", "error": 0.32},
            {"metric": "norm. latency mean (ms)", "kind": "relative", "error": -0.04},
            {"metric": "device hit rate", "kind": "points", "error": 7.0}]
    at_speed = [dict(r, error=r["error"] / 4) for r in rows]
    result = {"comparison": rows, "comparison_at_machine_speed": at_speed,
              "machine_speed": {"factor": 1.3, "before": {"factor": 1.46}, "after": {"factor": 1.05}}}
    gate = verdict(result, 0.10)
    assert not gate["passes"] and gate["worst"] == 0.32  # hit rates are not part of the gate
    assert gate["passes_at_machine_speed"] and gate["worst_at_machine_speed"] == 0.08
    assert verdict(result, 0.5)["passes"]
    [warning] = speed_warnings(result)  # only the probe more than 10% off
    assert "x1.460" in warning and "before" in warning


def test_per_turn_errors_and_step_kinds():
    from types import SimpleNamespace as R

    from sim.validate import per_turn, step_kind

    real = [R(turn=0, arrival=0.0, first_token=1.0, finish=2.0, generated=10),
            R(turn=0, arrival=0.0, first_token=3.0, finish=4.0, generated=10),
            R(turn=1, arrival=5.0, first_token=6.0, finish=7.0, generated=20)]
    sim = [R(turn=0, arrival=0.0, first_token=2.2, finish=3.0, generated=10),
           R(turn=0, arrival=0.0, first_token=2.2, finish=3.0, generated=10)]
    rows = per_turn(real, sim)
    assert [(r["turn"], r["requests_real"], r["requests_sim"]) for r in rows] == [(0, 2, 2), (1, 1, 0)]
    assert rows[1]["ttft_error"] is None and rows[1]["latency_error"] is None  # no simulated turn 1 to compare
    assert rows[0]["ttft_real_s"] == 2.0 and abs(rows[0]["ttft_error"] - 0.1) < 1e-12
    assert rows[0]["latency_real_ms"] == 300.0 and rows[0]["latency_sim_ms"] == 300.0
    step = {"decodes": 3, "prefills": [], "swap_in": 0, "swap_out": 0}
    assert step_kind(step) == "decode-only"
    assert step_kind({**step, "prefills": [[[[0, 5]], 5]]}) == "mixed"
    assert step_kind({**step, "decodes": 0, "prefills": [[[[0, 5]], 5]]}) == "prefill-only"
    assert step_kind({**step, "swap_out": 2}) == "with swaps"


def test_each_metric_is_judged_against_its_target_and_the_real_runs_spread():
    from sim.validate import metric_verdicts, real_spread

    def summary(throughput: float, device: float) -> dict:
        base = {"throughput_rps": throughput, "output_tokens_per_s": 1.0,
                "normalized_latency_ms": {"mean": 1.0, "p50": 1.0, "p90": 1.0}, "ttft_s": {"mean": 1.0, "p90": 1.0},
                "hit_rate": {"gpu": device, "cpu": 0.0, "miss": 1 - device}, "tokens": {"recomputed": 1.0},
                "swap_bytes": {"in": 1.0, "out": 1.0}, "suspensions": 0}
        return base

    spread = real_spread([summary(1.0, 0.50), summary(1.2, 0.52)])
    rows = {r["metric"]: r for r in spread}
    assert abs(rows["throughput (req/s)"]["spread"] - 0.2 / 1.1) < 1e-12
    assert abs(rows["device hit rate"]["spread"] - 2.0) < 1e-9  # points
    comparison = [{"metric": "throughput (req/s)", "kind": "relative", "error": 0.03},
                  {"metric": "output tokens/s", "kind": "relative", "error": 0.12},
                  {"metric": "norm. latency mean (ms)", "kind": "relative", "error": 0.30}]
    said = [v["verdict"] for v in metric_verdicts(comparison, spread[:3])]
    assert said == ["within target", "no target", "neither"]
    comparison[0]["error"] = -0.15  # over the 5% target, but the real runs differ by 18%
    assert metric_verdicts(comparison, spread[:3])[0]["verdict"] == "within the real runs' spread"
    comparison[2]["error"] = 0.0  # no spread in latency across these runs, and within target
    assert metric_verdicts(comparison, spread[:3])[2]["verdict"] == "within target"
    assert real_spread([summary(1.0, 0.5)])[0]["spread"] is None  # one run has no spread


@pytest.mark.parametrize("name, kind, real, accepted", [
    ("nvidia-h100-80gb-hbm3", "cuda", "cuda:0", True),  # named after the GPU, as the profiler writes it
    ("nvidia-h100-80gb-hbm3", None, "cuda:0", True),  # written before device_type: any non-CPU name is a GPU
    ("cpu", "cpu", "cuda:0", False),
    ("nvidia-a10g", "cuda", "cpu", False),
    ("cpu", None, "cpu", True),
])
def test_validation_matches_the_kind_of_device_not_its_name(name, kind, real, accepted) -> None:
    from types import SimpleNamespace

    from sim.validate import check_profile_device

    profile = SimpleNamespace(device=name, data={} if kind is None else {"device_type": kind})
    if accepted:
        check_profile_device(profile, real, "s.yaml")
    else:
        with pytest.raises(ValueError, match="profile this device first"):
            check_profile_device(profile, real, "s.yaml")
