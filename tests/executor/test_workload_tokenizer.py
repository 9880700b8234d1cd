"""`pensieve workload --tokenizer builtin`: token counts from SmolLM2's own tokenizer, not the estimate."""
import json

import yaml

from pensieve.cli import main
from pensieve.workload import load_counting_tokenizer


def test_builtin_tokenizer_counts_the_prompts_and_answers_exactly(tmp_path, capsys):
    prompt, answer = "Digits of pi: 3141592653589793238462643383279", "It stores memories. Dumbledore uses it."
    entry = {"id": "a", "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}
    (tmp_path / "sg.json").write_text(json.dumps([entry]))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"model": "smollm2-135m", "cache": {"device_gb": 1},
                                                     "workload": {"type": "sharegpt", "path": "sg.json"}}))
    assert main(["workload", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "t.jsonl"), "--tokenizer", "builtin"]) == 0
    assert "tokens counted by tokenizer" in capsys.readouterr().out
    row = json.loads((tmp_path / "t.jsonl").read_text())
    tokenizer = load_counting_tokenizer("builtin")
    expected = (len(tokenizer.encode(prompt, add_special_tokens=False)), len(tokenizer.encode(answer, add_special_tokens=False)))
    assert (row["prompt_tokens"], row["output_tokens"]) == expected
    assert expected != (round(len(prompt) / 4), round(len(answer) / 4))  # the estimate would differ
    assert main(["workload", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "u.jsonl"), "--tokenizer",
                 str(tmp_path / "nowhere")]) == 2
