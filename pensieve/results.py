"""The results folder every run writes, real or simulated: summary.json, requests.csv, the scenario."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from .outputs import atomic_open
from .request import Request

REQUEST_COLUMNS = [
    "request", "conversation", "turn", "arrival_s", "first_token_s", "finish_s", "prompt_tokens",
    "output_tokens", "history_tokens", "gpu_hit_tokens", "cpu_hit_tokens", "recomputed_tokens",
    "new_prompt_tokens", "swap_in_chunks", "suspensions", "normalized_latency_ms", "ttft_s",
]


def _percentiles(values: np.ndarray, scale: float = 1.0) -> dict[str, float]:
    if not len(values):
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"mean": float(values.mean() * scale), "p50": float(p50 * scale), "p90": float(p90 * scale),
            "p99": float(p99 * scale)}


def summarize(finished: list[Request], mode: str, policy: str, wall_s: float, swap_in_chunks: int,
              swap_out_chunks: int, bytes_per_chunk: int, extra: dict | None = None) -> dict:
    """The summary of DESIGN.md over finished requests; time spans from first arrival to last finish."""
    done = [r for r in finished if r.finish is not None]
    if done:
        start = min(r.arrival for r in done)
        duration = max(r.finish for r in done) - start
    else:
        duration = 0.0
    latency = np.array([(r.finish - r.arrival) / max(r.generated, 1) for r in done])
    ttft = np.array([r.first_token - r.arrival for r in done])
    history = sum(r.history_tokens for r in done)
    gpu = sum(r.gpu_hit_tokens for r in done)
    cpu = sum(r.cpu_hit_tokens for r in done)
    recomputed = sum(r.recomputed_tokens for r in done)
    generated = sum(r.generated for r in done)
    ttft_p = _percentiles(ttft)
    summary = {
        "mode": mode,
        "policy": policy,
        "requests": len(done),
        "duration_s": duration,
        "wall_s": wall_s,
        "throughput_rps": len(done) / duration if duration > 0 else 0.0,
        "output_tokens_per_s": generated / duration if duration > 0 else 0.0,
        "normalized_latency_ms": _percentiles(latency, 1e3),
        "ttft_s": {"mean": ttft_p["mean"], "p90": ttft_p["p90"]},
        "tokens": {
            "history": history, "gpu_hit": gpu, "cpu_hit": cpu, "recomputed": recomputed,
            "new_prompt": sum(r.new_prompt_tokens for r in done), "generated": generated,
            "resume_recomputed": sum(r.resume_recomputed_tokens for r in done),
        },
        "hit_rate": {
            "gpu": gpu / history if history else 0.0,
            "cpu": cpu / history if history else 0.0,
            "miss": recomputed / history if history else 0.0,
        },
        "swap_bytes": {"in": swap_in_chunks * bytes_per_chunk, "out": swap_out_chunks * bytes_per_chunk},
        "suspensions": sum(r.suspensions for r in done),
        # Compact enough for every sweep point's summary, enough for CDFs and per-turn plots without requests.csv.
        "quantiles": {"percent": QUANTILE_PERCENTS,
                      "ttft_s": np.percentile(ttft, QUANTILE_PERCENTS).tolist() if len(ttft) else [],
                      "normalized_latency_ms": (np.percentile(latency, QUANTILE_PERCENTS) * 1e3).tolist()
                      if len(latency) else []},
        "by_turn": by_turn(done),
    }
    summary.update(extra or {})
    return summary


QUANTILE_PERCENTS = [0, 1, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98, 99, 100]


def by_turn(done: list[Request]) -> dict[str, dict]:
    """Per turn index: requests, mean TTFT and its standard deviation, mean normalized latency, and mean
    tokens computed in prefill (new prompt + recomputed history) per request."""
    turns: dict[int, list[Request]] = {}
    for r in done:
        turns.setdefault(r.turn, []).append(r)
    out = {}
    for turn in sorted(turns):
        rs = turns[turn]
        ttft = np.array([ttft_s(r) for r in rs])
        out[str(turn)] = {
            "requests": len(rs), "ttft_mean_s": float(ttft.mean()),
            "ttft_std_s": float(ttft.std(ddof=1)) if len(rs) > 1 else 0.0,
            "norm_latency_mean_ms": float(np.mean([normalized_latency_ms(r) for r in rs])),
            "prefill_tokens_mean": float(np.mean([r.new_prompt_tokens + r.recomputed_tokens for r in rs])),
        }
    return out


def normalized_latency_ms(r: Request) -> float:
    """A finished turn's latency per generated token (the paper's metric), in ms."""
    return (r.finish - r.arrival) / max(r.generated, 1) * 1e3


def ttft_s(r: Request) -> float:
    """Seconds from a turn's arrival to its first generated token."""
    return r.first_token - r.arrival


def request_rows(finished: list[Request]) -> list[dict]:
    rows = []
    for r in sorted(finished, key=lambda r: r.id):
        if r.finish is None:
            continue
        rows.append({
            "request": r.id, "conversation": r.conversation_id, "turn": r.turn, "arrival_s": r.arrival,
            "first_token_s": r.first_token, "finish_s": r.finish, "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.generated, "history_tokens": r.history_tokens, "gpu_hit_tokens": r.gpu_hit_tokens,
            "cpu_hit_tokens": r.cpu_hit_tokens, "recomputed_tokens": r.recomputed_tokens,
            "new_prompt_tokens": r.new_prompt_tokens, "swap_in_chunks": r.swap_in_chunks,
            "suspensions": r.suspensions,
            "normalized_latency_ms": normalized_latency_ms(r), "ttft_s": ttft_s(r),
        })
    return rows


def write_results(folder: str | Path, summary: dict, finished: list[Request], scenario: dict,
                  timeline: list[dict] | None = None, rows: list[dict] | None = None) -> Path:
    """Write summary.json, requests.csv, scenario.yaml (resolved) and timeline.csv into `folder`
    (`rows`: `request_rows(finished)`, if the caller has them already)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
    with atomic_open(folder / "requests.csv", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=REQUEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows if rows is not None else request_rows(finished))
    write_text(folder / "scenario.yaml", yaml.safe_dump(scenario, sort_keys=False))
    if timeline:
        with atomic_open(folder / "timeline.csv", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(timeline[0]))
            writer.writeheader()
            writer.writerows(timeline)
    return folder


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain aligned text table: columns are (header, key) pairs; floats get 3 significant digits."""
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    cells = [[cell(row.get(key, "")) for _, key in columns] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (h, _) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for (h, _), w in zip(columns, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


SUMMARY_COLUMNS = [
    ("policy", "policy"), ("requests", "requests"), ("req/s", "throughput_rps"), ("tok/s", "output_tokens_per_s"),
    ("norm lat mean ms", "norm_latency_mean_ms"), ("p90 ms", "norm_latency_p90_ms"), ("ttft s", "ttft_mean_s"), ("gpu hit", "gpu_hit_fraction"),
    ("cpu hit", "cpu_hit_fraction"), ("miss", "recomputed_fraction"),
]


def summary_row(summary: dict, **extra) -> dict:
    """Flatten a summary into one table row; each column's name ends in its unit (fractions are 0-1)."""
    return {
        **extra, "policy": summary["policy"], "requests": summary["requests"],
        "throughput_rps": summary["throughput_rps"], "output_tokens_per_s": summary["output_tokens_per_s"],
        "norm_latency_mean_ms": summary["normalized_latency_ms"]["mean"], "norm_latency_p90_ms": summary["normalized_latency_ms"]["p90"],
        "ttft_mean_s": summary["ttft_s"]["mean"], "ttft_p90_s": summary["ttft_s"]["p90"],
        "gpu_hit_fraction": summary["hit_rate"]["gpu"],
        "cpu_hit_fraction": summary["hit_rate"]["cpu"], "recomputed_fraction": summary["hit_rate"]["miss"],
        "recomputed_tokens": summary["tokens"]["recomputed"],
    }


def print_json(data: dict) -> None:
    """A command's results as JSON on standard output."""
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def write_text(path: str | Path, text: str) -> None:
    """Write a whole text file atomically (see `pensieve.outputs`)."""
    with atomic_open(path) as out:
        out.write(text)
