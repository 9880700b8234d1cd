"""`pensieve paper`: the paper's six headline rows (§6.2) from one command.

Each row is one `scenarios/paper/*-8k.yaml` file: pensieve and stateless, each under unified and
prefill-first batching. Every (file, variant, seed) search runs in one process pool, so that the two
cores stay busy to the end rather than waiting on each file's slowest search.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import as_completed
from pathlib import Path

from tqdm import tqdm

from pensieve.cli import scenario_overrides
from pensieve.config import expand_sweep, load_scenario, replicate
from pensieve.outputs import prepare_folder
from pensieve.results import format_table, write_text
from pensieve.stats import estimate, paired_ratio

from .commands import _write_csv
from .search import _best, variant_label
from .sweep import throughput_at_target, worker_pool

# (scenario file, model, dataset, the paper's throughput ratio of Pensieve over vLLM 0.2 at the target, §6.2)
HEADLINE = [
    ("opt-13b-sharegpt-8k.yaml", "OPT-13B", "ShareGPT", 1.36),
    ("llama-2-13b-sharegpt-8k.yaml", "Llama-2-13B", "ShareGPT", 1.70),
    ("opt-13b-ultrachat-8k.yaml", "OPT-13B", "UltraChat", 1.17),
    ("llama-2-13b-ultrachat-8k.yaml", "Llama-2-13B", "UltraChat", 1.58),
    ("opt-66b-sharegpt-8k.yaml", "OPT-66B, 4 GPUs", "ShareGPT", 2.04),
    ("llama-2-70b-sharegpt-8k.yaml", "Llama-2-70B, 4 GPUs", "ShareGPT", 3.0),
]
# The columns of the table: the variant each one reads (see `variant_label`).
COLUMNS = {"pensieve": "pensieve (batching=unified)", "vllm_0_2_style": "stateless (batching=prefill-first)",
           "stateless": "stateless (batching=unified)", "pensieve_prefill_first": "pensieve (batching=prefill-first)"}
TABLE = [("model", "model"), ("dataset", "dataset"), ("target ms", "target_ms"), ("pensieve", "pensieve_rps"),
         ("vLLM-0.2-style", "vllm_0_2_style_rps"), ("stateless", "stateless_rps"),
         ("pensieve prefill-first", "pensieve_prefill_first_rps"), ("x vLLM-0.2-style", "x_vllm_0_2_style"),
         ("x stateless", "x_stateless"), ("paper x vLLM", "paper_x_vllm")]


def paper_command(args) -> int:
    folder = Path(args.scenarios)
    missing = [name for name, *_ in HEADLINE if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"--scenarios {folder}: missing {', '.join(missing)} (the paper's scenario files; "
                                "run from the repository root or point --scenarios at scenarios/paper)")
    searches = {}  # (file, variant, seed) -> (scenario, source, target)
    for name, *_ in HEADLINE:
        source = str(folder / name)
        scenario = load_scenario(source, scenario_overrides(args))
        for point, point_scenario in replicate(expand_sweep(scenario, source), scenario):
            key = (name, variant_label(point, point_scenario), point_scenario.seed)
            searches.setdefault(key, (point_scenario, source, scenario.latency_target_ms))
    out = prepare_folder(args.out, args.force, inputs=tuple(str(folder / n) for n, *_ in HEADLINE))
    found: dict = {}
    started = time.monotonic()
    interrupted = False
    try:
        with worker_pool(max(1, min(args.jobs or os.cpu_count() or 1, len(searches)))) as pool, \
                tqdm(total=len(searches), desc="paper searches", unit="search") as bar:
            futures = {pool.submit(throughput_at_target, s, source, target): key
                       for key, (s, source, target) in searches.items()}
            for future in as_completed(futures):
                found[futures[future]] = future.result()
                bar.update()
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted: writing the {len(found)} of {len(searches)} searches that finished")
    wall_s = time.monotonic() - started
    targets = {name: target for (name, _, _), (_, _, target) in searches.items()}
    rows = headline_rows(found, targets)
    raw = {f"{name} | {variant} | seed {seed}": _best(result) for (name, variant, seed), result in found.items()}
    write_text(out / "throughput_at_target.json", json.dumps(raw, indent=1, default=str))
    if rows:
        _write_csv(out / "headline.csv", rows)
        print(format_table(rows, TABLE))
    print(f"{len(found)} searches in {wall_s:.0f} s; results: {out}/ (headline.csv, throughput_at_target.json)")
    return 130 if interrupted else 0


def headline_rows(found: dict, targets: dict) -> list[dict]:
    """One row per headline file with every search done: each column's throughput at the target (mean ± its
    interval over seeds) and pensieve's ratios to the baselines, paired by seed."""
    rows = []
    for name, model, dataset, paper in HEADLINE:
        per_variant: dict = {}
        for (file, variant, seed), result in found.items():
            if file == name:
                best = result.get("best")
                per_variant.setdefault(variant, {})[seed] = best["throughput_rps"] if best else None
        if not all(COLUMNS[c] in per_variant for c in COLUMNS):
            continue
        seeds = sorted(per_variant[COLUMNS["pensieve"]])
        series = {c: [per_variant[COLUMNS[c]].get(s) for s in seeds] for c in COLUMNS}
        row = {"model": model, "dataset": dataset, "target_ms": targets[name], "seeds": len(seeds)}
        for column, values in series.items():
            row[f"{column}_rps"] = estimate(values).format(4)
        row["x_vllm_0_2_style"] = paired_ratio(series["pensieve"], series["vllm_0_2_style"]).format(3)
        row["x_stateless"] = paired_ratio(series["pensieve"], series["stateless"]).format(3)
        row["paper_x_vllm"] = paper
        rows.append(row)
    return rows

