"""`pensieve paper`: the six headline rows from one command (tiny stand-ins for the paper's files)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import yaml

from pensieve.cli import main
from sim.paper import HEADLINE, headline_rows

TINY = {
    "seed": 0,
    "model": "smollm2-135m",
    "profile": None,  # set per test: the shipped CPU profile
    "cache": {"device_gb": 0.05, "host_gb": 0.2, "policy": "pensieve"},
    "workload": {"type": "synthetic", "conversations": 6, "arrival_rate": 0.5, "think_time_s": 5, "max_context": 512},
    "latency_target_ms": 80,
    "sweep": {"cache.policy": ["pensieve", "stateless"], "scheduler.batching": ["unified", "prefill-first"]},
}


def test_headline_rows_pair_pensieve_with_each_baseline_by_seed():
    def result(rps):
        return {"best": {"throughput_rps": rps}}
    found = {}
    for seed, scale in ((0, 1.0), (1, 2.0)):  # seed 1 doubles every throughput: the ratios stay put
        found[("opt-13b-sharegpt-8k.yaml", "pensieve (batching=unified)", seed)] = result(3.0 * scale)
        found[("opt-13b-sharegpt-8k.yaml", "pensieve (batching=prefill-first)", seed)] = result(2.8 * scale)
        found[("opt-13b-sharegpt-8k.yaml", "stateless (batching=unified)", seed)] = result(2.5 * scale)
        found[("opt-13b-sharegpt-8k.yaml", "stateless (batching=prefill-first)", seed)] = result(2.0 * scale)
    found[("llama-2-13b-sharegpt-8k.yaml", "pensieve (batching=unified)", 0)] = result(1.0)  # incomplete: no row
    [row] = headline_rows(found, {"opt-13b-sharegpt-8k.yaml": 120})
    assert (row["model"], row["dataset"], row["target_ms"], row["seeds"]) == ("OPT-13B", "ShareGPT", 120, 2)
    assert row["x_vllm_0_2_style"] == "1.5 ± 0" and row["x_stateless"] == "1.2 ± 0" and row["paper_x_vllm"] == 1.36
    assert row["pensieve_rps"].startswith("4.5 ±")  # the mean over seeds, with the seeds' own spread


def test_paper_runs_every_headline_search_and_writes_the_table(tmp_path, capsys):
    folder = tmp_path / "paper"
    folder.mkdir()
    profile = str(Path(__file__).resolve().parents[2] / "profiles" / "cpu-smollm2-135m-float32.yaml")
    for name, *_ in HEADLINE:
        (folder / name).write_text(yaml.safe_dump({**TINY, "name": name.removesuffix(".yaml"), "profile": profile}))
    out = tmp_path / "out"
    assert main(["paper", "--scenarios", str(folder), "--out", str(out), "--jobs", "2"]) == 0
    with open(out / "headline.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == [model for _, model, *_ in HEADLINE]
    for row in rows:
        pensieve, vllm = float(row["pensieve_rps"]), float(row["vllm_0_2_style_rps"])
        assert math.isclose(float(row["x_vllm_0_2_style"]), pensieve / vllm, rel_tol=5e-3)  # printed to 3 digits
    assert "24 searches" in capsys.readouterr().out


def test_paper_names_the_missing_files(tmp_path, capsys):
    assert main(["paper", "--scenarios", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert f"--scenarios {tmp_path}: missing opt-13b-sharegpt-8k.yaml" in capsys.readouterr().err
