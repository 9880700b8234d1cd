"""Seeds, intervals and the baseline table; plots that follow the sweep's axes; the Python API.

These run the real commands on the shipped CPU profile with small workloads (seconds each).
"""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import yaml

import pensieve
from pensieve.cli import main
from pensieve.config import expand_sweep, parse_scenario, replicate
from pensieve.stats import estimate, paired_ratio
from sim.search import baseline_table, paired_point_table

SCENARIO = {
    "name": "rep",
    "seed": 0,
    "model": "smollm2-135m",
    "profile": "profiles/cpu-smollm2-135m-float32.yaml",
    "cache": {"device_gb": 0.05, "host_gb": 0.2, "policy": "pensieve"},
    "workload": {"type": "synthetic", "conversations": 20, "arrival_rate": 0.5, "think_time_s": 5,
                 "max_context": 1024},
    "latency_target_ms": 80,
}


def write(tmp_path, data: dict, name: str = "s.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- statistics


def test_estimate_is_the_student_t_interval():
    e = estimate([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, sd 1.29, sem 0.645, t(0.975, 3) = 3.182
    assert e.mean == 2.5 and e.n == 4 and e.half_width == pytest.approx(3.1824 * 1.2910 / 2, rel=1e-3)
    assert e.excludes(0.0) and not e.excludes(3.0)
    one = estimate([5.0])
    assert one.mean == 5.0 and math.isnan(one.half_width) and not one.excludes(0.0) and one.format() == "5"
    assert estimate([None, 2.0, 4.0]).n == 2  # a seed that found nothing is left out, not counted as 0


def test_paired_ratio_removes_the_seeds_own_spread():
    workload_noise = np.array([50.0, 100.0, 200.0, 400.0])  # seeds differ 8x
    policy, baseline = workload_noise * 1.10, workload_noise
    paired = paired_ratio(policy, baseline)
    assert paired.mean == pytest.approx(1.10) and paired.half_width == pytest.approx(0.0, abs=1e-12)
    unpaired = estimate(policy).half_width / estimate(baseline).mean
    assert unpaired > 0.5  # the same 10% would be lost in the seeds' spread without pairing


def test_baseline_table_marks_differences_inside_their_interval():
    def per_seed(values):
        return {s: {"throughput_rps": v, "recomputed_fraction": 0.1, "ttft_p90_s": 1.0} for s, v in enumerate(values)}

    results = {"stateless": {"per_seed": per_seed([1.0, 2.0, 3.0])},
               "clear": {"per_seed": per_seed([1.5, 3.0, 4.5])},
               "noise": {"per_seed": per_seed([1.1, 1.8, 3.1])}}
    rows = {r["policy"]: r for r in baseline_table(results, "stateless")}
    assert rows["stateless"]["verdict"] == "baseline"
    assert rows["clear"]["verdict"] == "larger than its interval" and rows["clear"]["ratio"].startswith("1.5")
    assert rows["noise"]["verdict"] == "within its interval (noise)"
    assert baseline_table(results, "vllm") == []  # no such policy in the sweep: no table
    results["stateless"]["per_seed"] = {s: None for s in range(3)}  # the baseline never met the target
    rows = {r["policy"]: r for r in baseline_table(results, "stateless")}
    assert rows["stateless"]["verdict"] == "baseline: target never met"
    assert rows["clear"]["verdict"] == "no seed where both met the target" and rows["clear"]["ratio"] == "nan"


def test_replicate_adds_the_seed_as_the_innermost_axis():
    scenario = parse_scenario({**SCENARIO, "seed": 10, "seeds": 3, "sweep": {"cache.policy": ["lru", "pensieve"]}})
    points = replicate(expand_sweep(scenario), scenario)
    assert [p for p, _ in points][:3] == [{"cache.policy": "lru", "seed": s} for s in (10, 11, 12)]
    assert [s.seed for _, s in points] == [10, 11, 12, 10, 11, 12]
    explicit = parse_scenario({**SCENARIO, "seeds": 3, "sweep": {"seed": [1, 5]}})
    assert len(replicate(expand_sweep(explicit), explicit)) == 2  # a seed axis already replicates


# ---------------------------------------------------------------- commands


def test_simulate_with_seeds_writes_each_seed_and_the_intervals(tmp_path, capsys):
    path = write(tmp_path, SCENARIO)
    assert main(["simulate", str(path), "--seeds", "3", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = tmp_path / "out"
    assert all((out / f"seed-{s}" / "requests.csv").exists() for s in (0, 1, 2))
    seeds = read_csv(out / "seeds.csv")
    assert [r["seed"] for r in seeds] == ["0", "1", "2"]
    summary = json.loads((out / "summary.json").read_text())
    latency = [float(r["norm_latency_mean_ms"]) for r in seeds]
    assert summary["seeds"] == [0, 1, 2] and summary["mean"]["norm_latency_mean_ms"]["mean"] == pytest.approx(
        np.mean(latency))
    assert summary["mean"]["norm_latency_mean_ms"]["half_width"] == pytest.approx(estimate(latency).half_width)
    assert "mean of 3" in capsys.readouterr().out


def test_sweep_with_seeds_aggregates_searches_per_seed_and_compares_with_the_baseline(tmp_path, capsys):
    data = {**SCENARIO, "sweep": {"cache.policy": ["pensieve", "stateless"], "workload.arrival_rate": [0.2, 0.5]}}
    path = write(tmp_path, data)
    out = tmp_path / "sw"
    assert main(["sweep", str(path), "--seeds", "2", "--out", str(out), "--jobs", "1", "--search",
                 "--keep-requests"]) == 0
    rows = read_csv(out / "sweep.csv")
    assert len(rows) == 8 and {r["seed"] for r in rows} == {"0", "1"}
    assert {"norm_latency_mean_ms", "ttft_mean_s", "gpu_hit_fraction", "recomputed_tokens"} <= set(rows[0])
    means = read_csv(out / "sweep_mean.csv")
    assert len(means) == 4 and all(r["seeds"] == "2" for r in means) and "norm_latency_mean_ms_ci95" in means[0]
    first = [float(r["norm_latency_mean_ms"]) for r in rows[:2]]
    assert float(means[0]["norm_latency_mean_ms"]) == pytest.approx(np.mean(first))
    summaries = json.loads((out / "summaries.json").read_text())
    assert summaries[1]["sweep_point"] == {"cache.policy": "pensieve", "workload.arrival_rate": 0.2, "seed": 1}
    assert len(list((out / "points").glob("*/requests.csv"))) == 8
    found = json.loads((out / "throughput_at_target.json").read_text())
    assert set(found["pensieve"]["per_seed"]) == {"0", "1"} and found["pensieve"]["throughput_rps"]["n"] >= 1
    table = read_csv(out / "policies_vs_baseline.csv")
    assert [r["policy"] for r in table] == ["pensieve", "stateless"] and table[1]["verdict"] == "baseline"
    for name in ("latency_vs_throughput.png", "hit_rates_by_policy.png", "latency_cdf_by_policy.png",
                 "speedup_by_turn.png"):
        assert (out / name).stat().st_size > 1000, name
    paired = read_csv(out / "sweep_vs_baseline.csv")  # pensieve over stateless at each arrival rate
    assert [(r["workload.arrival_rate"], r["policy"], r["seeds"]) for r in paired] == [
        ("0.2", "pensieve", "2"), ("0.5", "pensieve", "2")]
    by_key = {(r["cache.policy"], r["workload.arrival_rate"], r["seed"]): r for r in rows}
    ratios = [float(by_key[("pensieve", "0.5", s)]["recomputed_tokens"])
              / float(by_key[("stateless", "0.5", s)]["recomputed_tokens"]) for s in ("0", "1")]
    assert float(paired[1]["recomputed_tokens_ratio"]) == pytest.approx(np.mean(ratios))
    printed = capsys.readouterr().out
    assert "means over seeds" in printed and "against stateless" in printed and "at each point, paired" in printed


def test_the_paired_point_table_pairs_seeds_within_each_point_and_marks_real_differences():
    def row(policy, rate, seed, recomputed, latency):
        return {"cache.policy": policy, "workload.arrival_rate": rate, "seed": seed, "policy": policy,
                "throughput_rps": 1.0, "norm_latency_mean_ms": latency, "ttft_mean_s": 1.0,
                "cpu_hit_fraction": 0.5, "recomputed_tokens": recomputed}
    table = [row("base", 1, s, 100 * (s + 1), 10 * (s + 1)) for s in range(3)]
    table += [row("half", 1, s, 50 * (s + 1), 10 * (s + 1) * (1.1 if s == 0 else 0.9)) for s in range(3)]
    table += [row("half", 2, 0, 1, 1)]  # a point without the baseline: no row
    [out] = paired_point_table(table, ["cache.policy", "workload.arrival_rate"], "base")
    assert out["policy"] == "half" and out["seeds"] == 3 and out["workload.arrival_rate"] == 1
    assert out["recomputed_tokens_ratio"] == pytest.approx(0.5) and out["recomputed_tokens_ratio_ci95"] == 0
    assert out["recomputed_tokens_x"] == "0.5 ± 0 *"  # no seed-to-seed spread in the ratio: a real difference
    assert out["norm_latency_mean_ms_ratio"] == pytest.approx(1.1 / 3 + 0.9 * 2 / 3)
    assert not out["norm_latency_mean_ms_x"].endswith("*")  # 1.1, 0.9, 0.9: within its interval
    assert paired_point_table(table, ["cache.policy", "workload.arrival_rate"], "missing") == []


def test_a_cache_axis_gets_hit_rate_and_latency_plots_against_the_size(tmp_path):
    data = {**SCENARIO, "sweep": {"cache.host_gb": [0.0, 0.1, 0.3]}}
    out = tmp_path / "sw"
    assert main(["sweep", str(write(tmp_path, data)), "--out", str(out), "--jobs", "1"]) == 0
    assert (out / "hit_rates_vs_host_gb.png").exists() and (out / "latency_vs_host_gb.png").exists()
    assert not (out / "latency_vs_throughput.png").exists()  # no load axis: no fake load curve


def test_results_scenario_reruns_from_anywhere(tmp_path, monkeypatch):
    path = write(tmp_path, SCENARIO)
    assert main(["simulate", str(path), "--out", str(tmp_path / "a"), "--quiet", "--set", "cache.host_gb=0.1"]) == 0
    kept = yaml.safe_load((tmp_path / "a" / "scenario.yaml").read_text())
    assert kept["profile"].startswith("/") and kept["cache"]["host_gb"] == 0.1
    elsewhere = tmp_path / "deep" / "er"
    elsewhere.mkdir(parents=True)
    (elsewhere / "copy.yaml").write_text((tmp_path / "a" / "scenario.yaml").read_text())
    monkeypatch.chdir(elsewhere)
    assert main(["simulate", "copy.yaml", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert (json.loads((tmp_path / "a" / "summary.json").read_text())["normalized_latency_ms"] ==
            json.loads((tmp_path / "b" / "summary.json").read_text())["normalized_latency_ms"])


def test_run_and_validate_accept_set_and_refuse_a_bad_key_before_any_work(tmp_path, capsys):
    path = write(tmp_path, SCENARIO)
    for verb in ("run", "validate", "sweep", "simulate", "workload"):
        extra = ["--out", str(tmp_path / verb)]
        assert main([verb, str(path), *extra, "--set", "cache.hostgb=1"]) == 2, verb
        err = capsys.readouterr().err
        assert "cache.hostgb: unknown key; allowed here: device_gb" in err and "--set cache.hostgb=1" in err, err


# ---------------------------------------------------------------- the Python API


def test_python_api_returns_dataframes_and_matches_the_command(tmp_path):
    path = write(tmp_path, SCENARIO)
    run = pensieve.simulate(path, seeds=2, cache__host_gb=0.1)
    assert list(run.summary["seed"]) == [0, 1] and len(run.means) == 1 and run.means["seeds"][0] == 2
    assert set(run.requests["seed"]) == {0, 1} and "normalized_latency_ms" in run.requests.columns
    assert main(["simulate", str(path), "--seed", "1", "--set", "cache.host_gb=0.1", "--out", str(tmp_path / "c"),
                 "--quiet"]) == 0
    command = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert run.summaries[1]["normalized_latency_ms"] == command["normalized_latency_ms"]
    grid = pensieve.sweep(path, seeds=2, sweep={"cache.policy": ["pensieve", "stateless"]}, jobs=1, requests=True)
    assert len(grid.summary) == 4 and list(grid.means["cache.policy"]) == ["pensieve", "stateless"]
    assert "norm_latency_mean_ms_ci95" in grid.means.columns and set(grid.requests["cache.policy"]) == {
        "pensieve", "stateless"}
    with pytest.raises(pensieve.api.ScenarioError, match="cache.hostgb"):
        pensieve.simulate(path, cache__hostgb=1)
