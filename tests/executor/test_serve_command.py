"""`pensieve serve` as a process (SIGTERM ends it cleanly) and `pensieve bench-serve` against a live server."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from executor.engine import EngineConfig
from pensieve.cli import main
from tests.executor.serving import live_server
from tests.executor.test_realtime import scenario_file


def start_serve(*options: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PENSIEVE_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pensieve.cli", "serve", "--model", "random:tiny-llama", "--device", "cpu",
         "--port", "0", "--gpu-cache", "0.002", "--cpu-cache", "0.002", *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("listening on "):
            return proc, line.split()[2]
    proc.kill()
    raise AssertionError(f"serve did not start: {proc.stderr.read()}")


@pytest.mark.parametrize("shutdown_timeout, finish_reason", [("30", "length"), ("0.3", "abort")])
def test_sigterm_lets_in_flight_requests_finish_then_cancels_them_and_exits(shutdown_timeout, finish_reason) -> None:
    """Within the shutdown timeout a request in flight finishes; past it, it ends at its next token with
    finish_reason "abort" and a whole response (never a cut connection); the process exits 143."""
    proc, url = start_serve("--shutdown-timeout", shutdown_timeout)
    try:
        lines: list[str] = []
        first = threading.Event()

        def stream() -> None:
            body = {"model": "random:tiny-llama", "prompt": [5, 6, 7], "max_tokens": 900, "ignore_eos": True,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                    for line in response.iter_lines():
                        lines.append(line)
                        first.set()
            except httpx.HTTPError:
                lines.append("<connection closed>")
            first.set()

        client = threading.Thread(target=stream)
        client.start()
        assert first.wait(60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143
        client.join(60)
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert "Traceback" not in err and "pensieve serve: stopped;" in err
    data = [line[6:] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]", lines[-3:]
    reasons = [choice["finish_reason"] for d in data[:-1] for choice in json.loads(d)["choices"]]
    assert reasons[-1] == finish_reason and reasons.count(None) == len(reasons) - 1
    generated = json.loads(data[-2])["usage"]["completion_tokens"]
    assert generated == 900 if finish_reason == "length" else 0 < generated < 900


def test_serve_refuses_bad_options_before_loading_the_model(capsys) -> None:
    assert main(["serve", "--model", "random:tiny-llama", "--policy", "nonsense", "--port", "0"]) == 2
    assert "nonsense" in capsys.readouterr().err


@pytest.mark.parametrize("session", [True, False], ids=["session-ids", "prefix-alone"])
def test_bench_serve_replays_a_scenario_and_writes_what_run_writes(tmp_path: Path, tiny_model, session) -> None:
    scenario = scenario_file(tmp_path)
    out = tmp_path / "bench"
    with live_server(tiny_model("tiny-llama"), EngineConfig(device_slots=64, host_slots=64, chunk_tokens=4)) as live:
        args = ["bench-serve", live.url, str(scenario), "--out", str(out), "--quiet"]
        assert main(args + ([] if session else ["--no-session-id"])) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "serve" and summary["requests"] == 12 and summary["policy"] == "pensieve"
    assert summary["token_ids_returned"] and not summary["failed"] and summary["session_ids_sent"] == session
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert len(rows) == 12
    for row in rows:
        history, turn = int(row["history_tokens"]), int(row["turn"])
        # the whole history is kept on the device: every token sent before but the previous answer's
        # last one (which no step has computed; it is computed with the new prompt)
        assert history == max(0, turn * (12 + 6) - 1) and int(row["gpu_hit_tokens"]) == history
        assert int(row["output_tokens"]) == 6
        assert float(row["first_token_s"]) <= float(row["finish_s"])
    assert summary["tokens"]["gpu_hit"] > 0 and 0 < summary["cached_share"] < 1
    # read from the server's /metrics: ahead-of-time copies out, nothing needed back in
    chunk_bytes = 2 * 3 * 2 * 16 * 4 * 4  # K and V x layers x KV heads x head dim x fp32 bytes x chunk tokens
    assert summary["swap_bytes"]["in"] == 0.0 and summary["swap_bytes"]["out"] % chunk_bytes == 0
