"""Handlers of `pensieve simulate`, `pensieve sweep` and `pensieve workload`."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import yaml
from tqdm import tqdm

from pensieve.config import REPLICATION_AXIS, ScenarioError, expand_sweep, load_scenario, replicate, seed_list
from pensieve.cli import scenario_overrides
from pensieve.core import build_cost_model, build_scheduler, rng_for
from pensieve.outputs import atomic_open, check_new_file, prepare_folder
from pensieve.plots import PlotWorker, plot_sweep
from pensieve.results import SUMMARY_COLUMNS, format_table, request_rows, summary_row, write_results, write_text
from pensieve.stats import CONFIDENCE, Estimate, aggregate, estimate
from pensieve.workload import (CHARS_PER_TOKEN, TABLE2_COLUMNS, WorkloadError, build_workload, load_counting_tokenizer,
                               skipped_report, table2_rows)

from .driver import simulate
from .search import (BASELINE_COLUMNS, PAIRED_METRICS, SearchInterrupted, baseline_table, describe_search,
                     paired_point_table, search_variants)
from .sweep import run_points


def check_feasible(scenario, workload, source: str, cost) -> None:
    """Refuse, before simulating, what cannot run: an empty workload, a cache too small for a turn."""
    if not workload.conversations:
        raise WorkloadError(f"{source}: the workload has no conversation")
    cache = build_scheduler(scenario, cost).cache
    biggest = max(c.context_tokens for c in workload.conversations)
    need = -(-biggest // cache.chunk_tokens)
    if need > cache.device.capacity:
        raise WorkloadError(
            f"{source}: cache.device_gb holds {cache.device.capacity} chunks of {cache.chunk_tokens} tokens, but a "
            f"conversation reaches {biggest} tokens ({need} chunks); raise cache.device_gb or lower "
            "workload.max_context")


def require_profile(scenario, source: str, cost) -> None:
    """The simulator times steps with a profile; say so before anything runs."""
    if not cost.times_steps:
        raise ScenarioError(source, "profile", "the simulator needs a cost profile to time steps; name one (e.g. "
                                               "profile: profiles/cpu-smollm2-135m-float32.yaml), measure one with "
                                               "`pensieve profile`, or write an analytical one with "
                                               "`pensieve profile --analytical GPU`")


def report_repairs(scenario, cost) -> None:
    """Say which of the profile's tables were made nondecreasing on loading, and by how much."""
    for repair in getattr(cost, "repairs", ()):
        print(f"profile {scenario.profile}: {repair}")


def simulate_command(args) -> int:
    scenario = load_scenario(args.scenario, scenario_overrides(args))
    out = prepare_folder(args.out or Path("results") / scenario.name, args.force, inputs=(args.scenario,))
    if scenario.seeds > 1:
        return _simulate_seeds(scenario, args, out)
    run = _simulate_into(scenario, args, out)
    print(format_table([summary_row(run.summary)], SUMMARY_COLUMNS))
    if run.interrupted:
        print(f"interrupted: wrote the {run.summary['requests']} finished requests")
    print(f"results: {out}/ (summary.json, requests.csv, scenario.yaml, timeline.csv, plots)")
    return 130 if run.interrupted else 0


def _simulate_into(scenario, args, out: Path):
    """One simulation of `scenario` with its whole results folder written into `out`."""
    plots = PlotWorker()  # started first: matplotlib loads there while the profile loads here
    try:
        workload = build_workload(scenario.workload, rng_for(scenario))
        if workload.skipped:
            print(*skipped_report(workload), sep="\n")
        cost = build_cost_model(scenario, args.scenario)
        require_profile(scenario, args.scenario, cost)
        report_repairs(scenario, cost)
        check_feasible(scenario, workload, args.scenario, cost)
        run = simulate(scenario, workload, cost, progress=not args.quiet)
        rows = request_rows(run.finished)
        plots.submit("plot_run", out, run.summary, rows, run.timeline)
        write_results(out, run.summary, run.finished, scenario.model_dump(), run.timeline, rows=rows)
        plots.wait()
    finally:
        plots.close()
    return run


def _simulate_seeds(scenario, args, out: Path) -> int:
    """`seeds: N`: one results folder per seed (`seed-<s>/`), then the per-seed table (`seeds.csv`) and the
    means with 95% confidence intervals (`summary.json`). An interrupt keeps the seeds that finished."""
    rows: list[dict] = []
    interrupted = False
    for seed in seed_list(scenario):
        run = _simulate_into(scenario.model_copy(update={"seed": seed, "seeds": 1}), args, out / f"seed-{seed}")
        if run.interrupted:
            interrupted = True
            break
        rows.append(summary_row(run.summary, seed=seed))
    if rows:
        _write_csv(out / "seeds.csv", rows)
        columns = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and k != "seed"]
        means = {c: vars(estimate([r[c] for r in rows])) for c in columns}
        write_text(out / "summary.json", json.dumps({"policy": rows[0]["policy"], "seeds": [r["seed"] for r in rows],
                                                     "confidence": CONFIDENCE, "mean": means}, indent=1) + "\n")
        write_text(out / "scenario.yaml", yaml.safe_dump(scenario.model_dump(), sort_keys=False))
        print(format_table(rows, [("seed", "seed")] + SUMMARY_COLUMNS))
        print(format_table([_mean_cells(rows, columns)], SUMMARY_COLUMNS))
    if interrupted:
        print(f"interrupted: wrote the {len(rows)} seeds that finished")
    print(f"results: {out}/ (seed-<s>/ per seed; seeds.csv; summary.json with 95% confidence intervals)")
    return 130 if interrupted else 0


def _mean_cells(rows: list[dict], columns: list[str]) -> dict:
    """One table row of `mean ± half-width` strings over the rows (seeds)."""
    cells = {"policy": f"mean of {len(rows)}"}
    for c in columns:
        cells[c] = estimate([r[c] for r in rows]).format()
    return cells


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def sweep_command(args) -> int:
    scenario = load_scenario(args.scenario, scenario_overrides(args))
    cost = build_cost_model(scenario, args.scenario)
    require_profile(scenario, args.scenario, cost)
    report_repairs(scenario, cost)
    target = args.target or scenario.latency_target_ms
    if args.search and not target:
        raise ValueError(f"{args.scenario}: --search needs a latency target (--target or latency_target_ms)")
    points = replicate(expand_sweep(scenario, args.scenario), scenario)
    out = prepare_folder(args.out or Path("results") / f"{scenario.name}-sweep", args.force,
                         inputs=(args.scenario,))  # before any work
    jobs = args.jobs or os.cpu_count() or 1
    rows: list[dict] = []  # finished points only, in the sweep's order
    interrupted = False
    keep = out / "points" if args.keep_requests else None
    try:
        with tqdm(total=len(points), desc="sweep", unit="point") as bar:
            run_points(points, args.scenario, jobs, args.ray, bar, rows, keep)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted: writing the {len(rows)} of {len(points)} points that finished")
    axes = list(dict.fromkeys([*scenario.sweep, *([REPLICATION_AXIS] if scenario.seeds > 1 else [])]))
    table = [{k: v for k, v in row.items() if k != "summary"} for row in rows]
    if table:
        _write_csv(out / "sweep.csv", table)
        write_text(out / "summaries.json", json.dumps([row["summary"] for row in rows], indent=1))
        print(format_table(table, [(a, a) for a in axes] + SUMMARY_COLUMNS))
        plotted = table
        if REPLICATION_AXIS in axes:
            point_axes = [a for a in axes if a != REPLICATION_AXIS]
            plotted = aggregate(table, [*point_axes, "policy"], exclude=(REPLICATION_AXIS,))
            _write_csv(out / "sweep_mean.csv", plotted)
            print("\nmeans over seeds (± the 95% confidence interval's half-width; sweep_mean.csv):")
            print(format_table([_with_intervals(r) for r in plotted],
                               [(a, a) for a in point_axes] + [("seeds", "seeds")] + SUMMARY_COLUMNS))
            paired = paired_point_table(table, point_axes, args.baseline) if "cache.policy" in axes else []
            if paired:
                _write_csv(out / "sweep_vs_baseline.csv", paired)
                print(f"\nagainst {args.baseline} at each point, paired by seed (x baseline ± the 95% interval; "
                      f"*: larger than the interval; sweep_vs_baseline.csv):")
                print(format_table(paired, [(a, a) for a in point_axes if a != "cache.policy"]
                                   + [("policy", "policy"), ("seeds", "seeds")]
                                   + [(label, f"{metric}_x") for label, metric in PAIRED_METRICS]))
    plot_axes = [a for a in axes if a != REPLICATION_AXIS]
    summaries = [row["summary"] for row in rows]
    if interrupted:
        if table:
            plot_sweep(out, plotted, target, plot_axes, None, summaries)
        print(f"results: {out}/ ({len(rows)} of {len(points)} points)")
        return 130
    if args.search:
        try:
            results = search_variants(points, args.scenario, target, jobs, args.metric)
        except SearchInterrupted as stop:
            write_text(out / "throughput_at_target.json",
                       json.dumps({**stop.results, "interrupted": True}, indent=1, default=str))
            print(f"interrupted: wrote the search of {len(stop.results)} of {stop.total} policies that finished "
                  f"to {out}/throughput_at_target.json (the sweep's points are in sweep.csv)")
            return 130
        write_text(out / "throughput_at_target.json", json.dumps(results, indent=1, default=str))
        print(f"\nthroughput at {target} ms/token ({args.metric} normalized latency):")
        for policy, found in results.items():
            print(f"  {policy:>18}: " + describe_search(found))
        comparison = baseline_table(results, args.baseline)
        if not comparison:
            print(f"\nno table against --baseline {args.baseline!r}: the searches were for "
                  f"{', '.join(repr(k) for k in results)}")
        else:
            _write_csv(out / "policies_vs_baseline.csv", comparison)
            print(f"\nagainst {args.baseline} (paired by seed; 95% confidence intervals; policies_vs_baseline.csv):")
            print(format_table(comparison, BASELINE_COLUMNS))
    else:
        results = None
    if table:
        plot_sweep(out, plotted, target, plot_axes, results, summaries)
    print(f"results: {out}/")
    return 0


def _with_intervals(row: dict) -> dict:
    """A sweep_mean row with each metric shown as `mean ± half-width`."""
    shown = dict(row)
    for key, value in row.items():
        half = row.get(f"{key}_ci95")
        if isinstance(value, float) and half is not None:
            shown[key] = Estimate(value, half, row["seeds"]).format()
    return shown


def workload_command(args) -> int:
    """Draw or read a scenario's workload and write it as a JSONL trace, with its Table-2-style statistics
    beside the paper's. `--tokenizer builtin` (or a tokenizer folder) counts tokens exactly instead of by the
    characters-per-token estimate, for the formats that carry text."""
    scenario = load_scenario(args.scenario, scenario_overrides(args))
    path = check_new_file(args.out, args.force)
    tokenizer = load_counting_tokenizer(args.tokenizer) if args.tokenizer else None
    workload = build_workload(scenario.workload, rng_for(scenario), tokenizer)
    if workload.skipped:
        print(*skipped_report(workload), sep="\n")
    workload.to_trace(path)
    counted = "tokenizer" if tokenizer is not None else f"~{CHARS_PER_TOKEN:g} characters per token"
    print(format_table(table2_rows(workload), TABLE2_COLUMNS))
    print(f"({len(workload.conversations)} conversations, {workload.requests} requests; tokens counted by "
          f"{counted}) -> {args.out}")
    return 0
