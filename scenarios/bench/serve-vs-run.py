#!/usr/bin/env python3
"""What HTTP costs: one scenario served by `pensieve run` (the engine driven in-process) and by
`pensieve serve` driven by `pensieve bench-serve` (every turn a streamed /v1/completions request over
127.0.0.1), alternating, so that both see the same machine. Reports each pair's wall time (first
arrival to last finish; model loading excluded), the median ratio, TTFT per turn and the share of
prompt tokens served from kept KV.

    python scenarios/bench/serve-vs-run.py [--scenario scenarios/bench/multiturn-cpu.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PENSIEVE = [sys.executable, "-m", "pensieve.cli"]


def run_once(scenario: str, out: Path) -> dict:
    subprocess.run([*PENSIEVE, "run", scenario, "--out", str(out), "--force", "--quiet"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return measure(out)


def serve_once(scenario: str, out: Path, extra: list[str]) -> dict:
    server = subprocess.Popen([*PENSIEVE, "serve", "--scenario", scenario, "--port", "0", *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = next(line.split()[2] for line in server.stdout if line.startswith("listening on "))
        subprocess.run([*PENSIEVE, "bench-serve", url, scenario, "--out", str(out), "--force", "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    return measure(out)


def measure(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    rows = list(csv.DictReader((out / "requests.csv").open()))
    ttft = defaultdict(list)
    for row in rows:
        ttft[int(row["turn"])].append(float(row["ttft_s"]))
    sent = sum(int(r["history_tokens"]) + int(r["prompt_tokens"]) for r in rows)
    cached = sum(int(r["gpu_hit_tokens"]) + int(r["cpu_hit_tokens"]) for r in rows)
    return {"wall_s": summary["wall_s"], "requests": summary["requests"],
            "ttft_by_turn_s": {t: statistics.mean(v) for t, v in sorted(ttft.items())},
            "cached_share": cached / sent if sent else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="scenarios/bench/multiturn-cpu.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/serve-vs-run")
    parser.add_argument("--serve-option", action="append", default=[], help="passed to pensieve serve")
    args = parser.parse_args()
    out = Path(args.out)
    pairs = []
    for i in range(args.repeats):
        order = ("run", "serve") if i % 2 == 0 else ("serve", "run")
        pair = {}
        for kind in order:
            folder = out / f"{kind}-{i}"
            pair[kind] = run_once(args.scenario, folder) if kind == "run" else \
                serve_once(args.scenario, folder, args.serve_option)
            print(f"repeat {i}: {kind:5s} {pair[kind]['wall_s']:6.2f} s", flush=True)
        pairs.append(pair)
    ratios = [p["serve"]["wall_s"] / p["run"]["wall_s"] for p in pairs]
    report = {
        "scenario": args.scenario, "pairs": pairs,
        "run_wall_s_median": statistics.median(p["run"]["wall_s"] for p in pairs),
        "serve_wall_s_median": statistics.median(p["serve"]["wall_s"] for p in pairs),
        "serve_over_run_median": statistics.median(ratios), "serve_over_run": ratios,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve-vs-run.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwall s, median of {args.repeats}: run {report['run_wall_s_median']:.2f}, serve over HTTP "
          f"{report['serve_wall_s_median']:.2f}; serve / run per pair {', '.join(f'{r:.3f}' for r in ratios)} "
          f"(median {report['serve_over_run_median']:.3f})")
    print(f"{'turn':>4} {'run TTFT s':>11} {'serve TTFT s':>13}")
    for turn in pairs[0]["run"]["ttft_by_turn_s"]:
        run_t = statistics.median(p["run"]["ttft_by_turn_s"][turn] for p in pairs)
        serve_t = statistics.median(p["serve"]["ttft_by_turn_s"][turn] for p in pairs)
        print(f"{turn + 1:>4} {run_t:>11.3f} {serve_t:>13.3f}")
    print(f"cached share of prompt tokens: run {pairs[0]['run']['cached_share']:.3f}, "
          f"serve {pairs[0]['serve']['cached_share']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
