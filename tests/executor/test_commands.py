"""`pensieve compare` and `pensieve chat`, run through the real command-line entry point."""

from __future__ import annotations

import io
import re

import pytest

import executor.server
from pensieve.cli import main
from tests.executor.test_engine import smollm2

TINY = ["--model", "random:tiny-llama", "--device", "cpu", "--gpu-cache", "0.002", "--cpu-cache", "0.002"]


def test_compare_prints_a_row_per_turn_with_both_modes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", *TINY, "--num-conversations", "2", "--turns", "3", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"turn +history +pensieve ms +stateless ms +speedup +gpu hit +cpu hit +miss", out)
    rows = re.findall(r"^ +(\d|all) +(\d+) +[\d.]+ +[\d.]+ +[\d.]+x +([\d.]+)% +([\d.]+)% +([\d.]+)%$", out, re.M)
    assert [r[0] for r in rows] == ["1", "2", "3", "all"]
    assert rows[0][1] == "0" and int(rows[2][1]) > int(rows[1][1]) > 0  # the history grows turn by turn
    assert rows[1][2] == "100.0"  # ample cache: the stateful mode finds the whole history on the device
    # Both modes did the same work: exactly --max-new-tokens per turn, EOS ignored.
    assert out.count("Tokens Generated: 24") == 2
    assert "Pensieve (Stateful)" in out and "Stateless (vLLM baseline)" in out
    assert "pensieve" in err and "stateless" in err and "6/6" in err  # progress bars


def test_chat_reads_turns_until_quit_with_live_statistics(capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    too_long = "x" * 1100  # byte-level tokens: over tiny-llama's 1024-token context
    monkeypatch.setattr("sys.stdin", io.StringIO(f"Hello\n/stats\n\n{too_long}\nHow are you?\n/quit\nnever read\n"))
    assert main(["chat", *TINY, "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert "-token context of model random:tiny-llama" in err  # reported; the chat goes on
    assert out.count("assistant> ") == 2
    assert "Total Requests: 1" in out  # /stats after the first turn
    status = re.findall(r"^\[prefill \d+ ms \| history (\d+) tok \| hits: device (\d+)% host \d+% miss (\d+)% \| "
                        r"device [\d.]+/[\d.]+ GB \| host [\d.]+/[\d.]+ GB\]$", out, re.M)
    assert [(h == "0", d, m) for h, d, m in status] == [(True, "0", "0"), (False, "100", "0")]


def test_chat_vllm_mode_recomputes_and_compare_mode_delegates(capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\n"))  # EOF ends the chat
    assert main(["chat", *TINY, "--mode", "vllm", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "mode stateless" in out and "miss 100%" in out

    assert main(["chat", *TINY, "--mode", "compare", "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ +5 ", out, re.M) and "Total Requests: 25" in out  # compare's defaults: 5 x 5


def test_bad_options_are_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", *TINY, "--policy", "fifo"]) == 2
    assert "pensieve chat: error: unknown policy 'fifo'" in capsys.readouterr().err
    assert main(["compare", *TINY[:4], "--gpu-cache", "0.00001"]) == 2
    assert "holds no 32-token KV chunk" in capsys.readouterr().err


def test_chat_on_smollm2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_network) -> None:
    monkeypatch.setattr(executor.server, "load_model", lambda name, device, dtype: smollm2())  # loaded once
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\nAnd of Germany?\n"))
    assert main(["chat", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    answers = re.findall(r"^assistant> (.*)$", out, re.M)
    assert len(answers) == 2 and "Paris" in answers[0] and "Berlin" in answers[1]
    assert "hits: device 100%" in out
