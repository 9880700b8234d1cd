"""Workloads: Table 2 presets, the context cap, ShareGPT files with bad entries, traces."""
import json

import numpy as np
import pytest

from pensieve.config import parse_scenario
from pensieve.workload import PRESETS, WorkloadError, build_workload, load_sharegpt, load_trace, synthetic


@pytest.mark.parametrize("preset", ["sharegpt", "ultrachat"])
def test_synthetic_presets_match_table_2(preset):
    p = PRESETS[preset]
    w = synthetic(np.random.default_rng(0), 20000, 1.0, p["turns_mean"], p["prompt_mean"], p["output_mean"],
                  1.0, 0.8, "exponential", 60.0, 10**9)
    turns = [t for c in w.conversations for t in c.turns]
    assert np.mean([len(c.turns) for c in w.conversations]) == pytest.approx(p["turns_mean"], rel=0.03)
    assert np.mean([t.prompt_tokens for t in turns]) == pytest.approx(p["prompt_mean"], rel=0.05)
    assert np.mean([t.output_tokens for t in turns]) == pytest.approx(p["output_mean"], rel=0.05)
    starts = np.array([c.start_s for c in w.conversations])
    assert np.mean(np.diff(starts)) == pytest.approx(1.0, rel=0.05)  # Poisson at 1 per second
    thinks = [t.think_s for c in w.conversations for t in c.turns[1:]]
    assert np.mean(thinks) == pytest.approx(60.0, rel=0.05)


def test_context_cap_ends_conversations():
    w = synthetic(np.random.default_rng(1), 500, 1.0, 20, 200, 800, 1.0, 0.8, "none", 0, 4096)
    assert all(c.context_tokens <= 4096 for c in w.conversations)
    assert max(len(c.turns) for c in w.conversations) < 20 * 3


def test_sharegpt_file_with_a_malformed_entry(tmp_path):
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "x" * 40}, {"from": "gpt", "value": "y" * 400},
                                      {"from": "human", "value": "z" * 8}, {"from": "gpt", "value": "w" * 80}]},
        {"id": "bad", "conversations": [{"from": "human"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    w = load_sharegpt(path, np.random.default_rng(0), 1.0, "none", 0, 16384)
    assert [c.id for c in w.conversations] == ["a", "c"]
    assert [(t.prompt_tokens, t.output_tokens) for t in w.conversations[0].turns] == [(10, 100), (2, 20)]
    assert len(w.skipped) == 1 and "entry 1" in w.skipped[0]
    with pytest.raises(WorkloadError, match="entry 1: message 0 lacks"):
        load_sharegpt(path, np.random.default_rng(0), 1.0, "none", 0, 16384, on_error="refuse")


def test_trace_round_trip_and_errors(tmp_path):
    scenario = parse_scenario({"cache": {"device_gb": 1}, "workload": {"type": "synthetic", "conversations": 30}})
    w = build_workload(scenario.workload, np.random.default_rng(3))
    path = tmp_path / "t.jsonl"
    w.to_trace(path)
    back = load_trace(path, 16384)
    assert [(c.id, c.start_s, c.turns) for c in back.conversations] == [(c.id, c.start_s, c.turns)
                                                                       for c in w.conversations]
    path.write_text('{"conversation": 1, "turn": 0, "prompt_tokens": 5}\n')
    with pytest.raises(WorkloadError, match=r"t.jsonl:1: bad trace line"):
        load_trace(path, 16384)


def test_workload_errors_name_the_key():
    from pensieve.config import ScenarioError

    with pytest.raises(ScenarioError, match="workload: .*needs 'path'"):
        parse_scenario({"cache": {"device_gb": 1}, "workload": {"type": "trace"}})
    with pytest.raises(ScenarioError, match="workload.arrival_rate"):
        parse_scenario({"cache": {"device_gb": 1}, "workload": {"arrival_rate": 0}})
