"""`pensieve run`: a scenario served for real, its results folder, outputs.jsonl, and Ctrl-C."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from executor.models import preset_dims
from pensieve.cli import main
from tests.executor.interrupt import press_ctrl_c_after


def scenario_file(tmp_path: Path) -> Path:
    dims = {k: v for k, v in preset_dims("tiny-llama").items() if k != "name"} | {"dtype": "float32"}
    data = {
        "name": "t-real", "seed": 3, "model": {"name": "tiny-llama", **dims},
        "cache": {"device_gb": 0.00008, "host_gb": 0.0001, "chunk_tokens": 4, "policy": "pensieve"},
        "scheduler": {"max_batch_tokens": 256, "max_batch_requests": 4},
        "workload": {"type": "fixed", "conversations": 4, "turns": 3, "prompt_tokens": 12, "output_tokens": 6,
                     "arrival_rate": float("inf"), "think_time": "none"},
        "run": {"device": "cpu", "model_path": "random:tiny-llama"},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def outputs(folder: Path) -> dict:
    lines = [json.loads(line) for line in (folder / "outputs.jsonl").read_text().splitlines()]
    return {(o["conversation"], o["turn"]): (o["prompt_ids"], o["generated_ids"]) for o in lines}


def test_run_serves_every_turn_and_pensieve_generates_what_stateless_does(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert main(["run", str(scenario_file(tmp_path)), "--policy", "pensieve,stateless", "--quiet",
                 "--out", str(out)]) == 0
    pensieve, stateless = outputs(out / "pensieve"), outputs(out / "stateless")
    assert len(pensieve) == 12 and pensieve == stateless  # same prompts, same greedy tokens
    assert all(len(generated) == 6 for _, generated in pensieve.values())
    summary = json.loads((out / "pensieve" / "summary.json").read_text())
    assert summary["requests"] == 12 and not summary["interrupted"]
    assert summary["swap_bytes"]["out"] > 0  # the tiny tiers made it swap
    for name in ("requests.csv", "steps.jsonl", "scenario.yaml", "hit_rates.png"):
        assert (out / "pensieve" / name).stat().st_size > 0


def test_ctrl_c_during_run_writes_the_turns_that_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    press_ctrl_c_after(monkeypatch, steps=25)
    out = tmp_path / "r"
    assert main(["run", str(scenario_file(tmp_path)), "--quiet", "--out", str(out)]) == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and 0 < summary["requests"] < 12
    assert summary["unfinished"] == 12 - summary["requests"]
    assert len(outputs(out)) == summary["requests"]


def test_the_core_a_real_run_builds_is_the_simulators(tmp_path: Path) -> None:
    """Every scenario setting that changes eviction or scheduling reaches the engine's core: the
    policy with its params, the cost table, the tiers and every scheduler setting."""
    from executor.engine import core_for, kv_bytes_per_token
    from executor.realtime import engine_config
    from pensieve.config import load_scenario
    from pensieve.core import build_cost_model, build_scheduler, core_settings
    from pensieve.tiers import slots_for

    data = yaml.safe_load(scenario_file(tmp_path).read_text())
    data["cache"]["policy"] = {"type": "tests.pensieve.user_policy:AgedCost", "params": {"power": 0.5}}
    data["scheduler"] = {"max_batch_tokens": 100, "max_batch_requests": 3, "decode_reserve": 0.2,
                         "swap_out_threshold": 0.4, "swap_out_batch": 0.05}
    data["cost_model"] = {"a": 3e-6, "c": 2e-3}
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(data))
    scenario = load_scenario(path)
    dims = {**preset_dims("tiny-llama"), "dtype": "float32"}
    cost = build_cost_model(scenario)

    def engine_core(policy=None):
        config = engine_config(scenario, policy)
        per_chunk = kv_bytes_per_token(dims) * config.chunk_tokens
        return core_for(config, slots_for(config.device_cache_gb, per_chunk), slots_for(config.host_cache_gb, per_chunk),
                        dims["max_context"], cost, per_chunk)

    simulated = core_settings(build_scheduler(scenario, cost))
    assert simulated["policy_attributes"] == {"power": 0.5}
    assert simulated["swap_out_batch"] == 64 and simulated["decode_reserve"] == 0.2
    assert core_settings(engine_core()) == simulated
    # a --policy override leaves the scenario policy's params behind, in both
    assert core_settings(engine_core("lru")) == core_settings(build_scheduler(scenario, cost, policy="lru"))


def test_real_run_prompts_are_the_same_in_every_process():
    """Prompt token ids come from a checksum of the conversation id, not the per-process hash()."""
    code = "from pensieve.workload import prompt_ids; print(prompt_ids(3, 'c7', 1, 8, 500))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")}
    assert len(runs) == 1 and runs.pop().startswith("[")


def test_the_real_executor_refuses_tensor_parallelism(tmp_path: Path) -> None:
    from executor.realtime import load_scenario_model
    from pensieve.config import load_scenario

    data = yaml.safe_load(scenario_file(tmp_path).read_text())
    data.update(model="opt-66b", tensor_parallel=4, profile=None)
    path = tmp_path / "tp.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="tensor_parallel: 4: the real executor runs a model on one device"):
        load_scenario_model(load_scenario(path), str(path))
