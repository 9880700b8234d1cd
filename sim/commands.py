"""Handlers of `pensieve simulate`, `pensieve sweep` and `pensieve workload`."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from tqdm import tqdm

from pensieve.config import ScenarioError, expand_sweep, load_scenario
from pensieve.core import build_cost_model, build_scheduler, rng_for
from pensieve.outputs import atomic_open, check_new_file, prepare_folder
from pensieve.plots import PlotWorker, plot_sweep
from pensieve.results import SUMMARY_COLUMNS, format_table, request_rows, summary_row, write_results, write_text
from pensieve.workload import WorkloadError, build_workload

from .driver import simulate
from .sweep import run_points, throughput_at_target, worker_pool


def _check_feasible(scenario, workload, source: str, cost) -> None:
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
    scenario = load_scenario(args.scenario)
    if args.seed is not None:
        scenario = scenario.model_copy(update={"seed": args.seed})
    out = prepare_folder(args.out or Path("results") / scenario.name, args.force, inputs=(args.scenario,))
    plots = PlotWorker()  # started first: matplotlib loads there while the profile loads here
    try:
        workload = build_workload(scenario.workload, rng_for(scenario))
        for problem in workload.skipped:
            print(f"skipped: {problem}")
        cost = build_cost_model(scenario, args.scenario)
        require_profile(scenario, args.scenario, cost)
        report_repairs(scenario, cost)
        _check_feasible(scenario, workload, args.scenario, cost)
        run = simulate(scenario, workload, cost, progress=not args.quiet)
        rows = request_rows(run.finished)
        plots.submit("plot_run", out, run.summary, rows, run.timeline)
        write_results(out, run.summary, run.finished, scenario.model_dump(), run.timeline, rows=rows)
        plots.wait()
    finally:
        plots.close()
    print(format_table([summary_row(run.summary)], SUMMARY_COLUMNS))
    if run.interrupted:
        print(f"interrupted: wrote the {run.summary['requests']} finished requests")
    print(f"results: {out}/ (summary.json, requests.csv, scenario.yaml, timeline.csv, plots)")
    return 130 if run.interrupted else 0


def sweep_command(args) -> int:
    scenario = load_scenario(args.scenario)
    cost = build_cost_model(scenario, args.scenario)
    require_profile(scenario, args.scenario, cost)
    report_repairs(scenario, cost)
    target = args.target or scenario.latency_target_ms
    if args.search and not target:
        raise ValueError(f"{args.scenario}: --search needs a latency target (--target or latency_target_ms)")
    points = expand_sweep(scenario, args.scenario)
    out = prepare_folder(args.out or Path("results") / f"{scenario.name}-sweep", args.force,
                         inputs=(args.scenario,))  # before any work
    jobs = args.jobs or os.cpu_count() or 1
    rows: list[dict] = []  # finished points only, in the sweep's order
    interrupted = False
    try:
        with tqdm(total=len(points), desc="sweep", unit="point") as bar:
            run_points(points, args.scenario, jobs, args.ray, bar, rows)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted: writing the {len(rows)} of {len(points)} points that finished")
    table = [{k: v for k, v in row.items() if k != "summary"} for row in rows]
    if table:
        with atomic_open(out / "sweep.csv", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        write_text(out / "summaries.json", json.dumps([row["summary"] for row in rows], indent=1))
        plot_sweep(out, table, target)
        axes = list(scenario.sweep)
        print(format_table(table, [(a, a) for a in axes] + SUMMARY_COLUMNS))
    if interrupted:
        print(f"results: {out}/ ({len(rows)} of {len(points)} points)")
        return 130
    if args.search:
        try:
            results = _search(scenario, args, points, target, jobs)
        except SearchInterrupted as stop:
            write_text(out / "throughput_at_target.json",
                       json.dumps({**stop.results, "interrupted": True}, indent=1, default=str))
            print(f"interrupted: wrote the search of {len(stop.results)} of {stop.total} policies that finished "
                  f"to {out}/throughput_at_target.json (the sweep's points are in sweep.csv)")
            return 130
        write_text(out / "throughput_at_target.json", json.dumps(results, indent=1, default=str))
        print(f"\nthroughput at {target} ms/token ({args.metric} normalized latency):")
        for policy, best in results.items():
            print(f"  {policy:>18}: " + (f"{best['throughput_rps']:.3f} req/s at arrival rate "
                                         f"{best['arrival_rate']:.4g}/s" if best else "target not met"))
    print(f"results: {out}/")
    return 0


def _search(scenario, args, points, target: float, jobs: int) -> dict:
    """Throughput at the latency target per distinct policy among the sweep's points."""
    by_policy = {}
    for _, point in points:
        by_policy.setdefault(point.cache.policy.type, point)
    found: dict = {}
    try:
        with worker_pool(max(1, min(jobs, len(by_policy)))) as pool:
            futures = {p: pool.submit(throughput_at_target, s, args.scenario, target, 6, args.metric)
                       for p, s in by_policy.items()}
            try:
                for p, f in futures.items():
                    found[p] = f.result()
            except KeyboardInterrupt:  # keep the searches that had finished, in any order
                for p, f in futures.items():
                    if p not in found and f.done() and not f.cancelled() and f.exception() is None:
                        found[p] = f.result()
                raise
    except KeyboardInterrupt:
        searched = {p: _best(r) for p, r in found.items()}
        raise SearchInterrupted(searched, len(by_policy)) from None
    return {p: _best(r) for p, r in found.items()}


class SearchInterrupted(KeyboardInterrupt):
    """An interrupted --search, with the policies whose search had finished."""

    def __init__(self, results: dict, total: int) -> None:
        super().__init__()
        self.results, self.total = results, total


def _best(found: dict) -> dict | None:
    return {k: v for k, v in found["best"].items() if k != "summary"} if found["best"] else None


def workload_command(args) -> int:
    """Draw or read a scenario's workload and write it as a JSONL trace, with a few statistics."""
    scenario = load_scenario(args.scenario)
    path = check_new_file(args.out, args.force)
    workload = build_workload(scenario.workload, rng_for(scenario))
    for problem in workload.skipped:
        print(f"skipped: {problem}")
    workload.to_trace(path)
    turns = [t for c in workload.conversations for t in c.turns]
    print(f"{len(workload.conversations)} conversations, {len(turns)} turns; mean turns "
          f"{len(turns) / len(workload.conversations):.2f}, mean prompt {sum(t.prompt_tokens for t in turns) / len(turns):.1f}"
          f", mean output {sum(t.output_tokens for t in turns) / len(turns):.1f} tokens -> {args.out}")
    return 0
