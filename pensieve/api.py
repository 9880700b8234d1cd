"""The Python API for notebooks: `pensieve.simulate` and `pensieve.sweep`, returning pandas DataFrames.

They run exactly what `pensieve simulate` and `pensieve sweep` run (the same scenario schema, the same
seeds, the same simulator), without writing a results folder. The simulator and pandas are imported
when called, so `import pensieve` stays free of simpy, pandas and torch.

    import pensieve
    run = pensieve.simulate("scenarios/quickstart.yaml", seeds=3, cache__host_gb=1.0)
    run.summary          # one row per seed; run.means: mean and 95% interval per metric
    run.requests         # one row per finished request, with its seed
    grid = pensieve.sweep("scenarios/quickstart.yaml", seeds=3,
                          sweep={"cache.policy": ["pensieve", "lru"], "workload.arrival_rate": [0.05, 0.1]})
    grid.means           # one row per point: metrics and their `_ci95` half-widths

Overrides are keyword arguments whose double underscores stand for the dots of a key path
(`cache__host_gb=1.0` is `--set cache.host_gb=1.0`), or a mapping passed as `overrides=`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (Scenario, ScenarioError, apply_values, load_scenario, parse_scenario, replicate, resolve_paths,
                     seed_list)
from .results import request_rows, summary_row
from .stats import aggregate


@dataclass
class Results:
    """What a simulation or a sweep gives back: `summary` (a DataFrame, one row per run: the sweep point, its
    seed and every summary column), `means` (one row per point over its seeds, with `<column>_ci95`
    half-widths), `requests` (a DataFrame of finished requests, with the point's columns; empty for a sweep
    unless requests=True) and `summaries` (the runs' whole summary dicts)."""

    summary: Any
    means: Any
    requests: Any
    summaries: list[dict]
    scenario: Scenario


def _scenario(scenario: str | Path | dict | Scenario, overrides: dict[str, Any]) -> Scenario:
    """A validated scenario from a path, a mapping or a Scenario, with `overrides` (key path -> value)."""
    values = {key.replace("__", "."): value for key, value in overrides.items()}
    if isinstance(scenario, (str, Path)):
        return load_scenario(scenario, values=values)
    source = "<scenario>"
    data = scenario.model_dump() if isinstance(scenario, Scenario) else scenario
    parsed = parse_scenario(apply_values(data, values, source), source)
    return resolve_paths(parsed, Path.cwd() / "scenario.yaml")  # a mapping's paths: from the working directory


def simulate(scenario: str | Path | dict | Scenario, *, seeds: int | None = None, seed: int | None = None,
             progress: bool = False, overrides: dict[str, Any] | None = None, **key_values: Any) -> Results:
    """Simulate a scenario (a YAML path, a mapping or a Scenario) under `seeds` seeds (default: the
    scenario's); keyword overrides as described in the module's docstring."""
    import pandas as pd

    from sim.commands import check_feasible, require_profile
    from sim.driver import simulate as run_simulation
    from .core import build_cost_model, rng_for
    from .workload import build_workload

    values = {**(overrides or {}), **key_values}
    values |= {"seeds": seeds} if seeds is not None else {}
    values |= {"seed": seed} if seed is not None else {}
    base = _scenario(scenario, values)
    source = str(scenario) if isinstance(scenario, (str, Path)) else "<scenario>"
    cost = build_cost_model(base, source)
    require_profile(base, source, cost)
    rows, requests, summaries = [], [], []
    for one in (base.model_copy(update={"seed": s}) for s in seed_list(base)):
        workload = build_workload(one.workload, rng_for(one))
        check_feasible(one, workload, source, cost)
        run = run_simulation(one, workload, cost, progress=progress)
        if run.interrupted:
            raise KeyboardInterrupt
        summaries.append(run.summary)
        rows.append(summary_row(run.summary, seed=one.seed))
        requests += [{"seed": one.seed, **r} for r in request_rows(run.finished)]
    means = pd.DataFrame(aggregate(rows, ["policy"], exclude=("seed",)))
    return Results(pd.DataFrame(rows), means, pd.DataFrame(requests), summaries, base)


def sweep(scenario: str | Path | dict | Scenario, *, seeds: int | None = None, sweep: dict[str, list] | None = None,
          jobs: int | None = None, requests: bool = False, overrides: dict[str, Any] | None = None,
          **key_values: Any) -> Results:
    """Every point of the scenario's sweep (or of `sweep`, key path -> values) under `seeds` seeds, in
    `jobs` processes (default: one per core); `requests=True` also gathers every point's requests."""
    import os
    import tempfile

    import pandas as pd

    from sim.sweep import run_points
    from .config import REPLICATION_AXIS, expand_sweep

    values = {**(overrides or {}), **key_values}
    values |= {"seeds": seeds} if seeds is not None else {}
    values |= {"sweep": sweep} if sweep is not None else {}
    base = _scenario(scenario, values)
    source = str(scenario) if isinstance(scenario, (str, Path)) else "<scenario>"
    points = replicate(expand_sweep(base, source), base)
    with tempfile.TemporaryDirectory(prefix="pensieve-sweep-") as folder:
        keep = Path(folder) if requests else None
        rows = run_points(points, source, jobs or os.cpu_count() or 1, None, None, None, keep)
        gathered = []
        if keep:
            for i, (point, _) in enumerate(points):
                frame = pd.read_csv(keep / f"{i:04d}" / "requests.csv")
                for key, value in point.items():
                    frame.insert(0, key, json.dumps(value) if isinstance(value, (dict, list)) else value)
                gathered.append(frame)
    table = [{k: v for k, v in row.items() if k != "summary"} for row in rows]
    axes = [a for a in base.sweep if a != REPLICATION_AXIS]
    means = pd.DataFrame(aggregate(table, [*axes, "policy"], exclude=(REPLICATION_AXIS,)))
    return Results(pd.DataFrame(table), means, pd.concat(gathered, ignore_index=True) if gathered else pd.DataFrame(),
                   [row["summary"] for row in rows], base)


__all__ = ["Results", "ScenarioError", "simulate", "sweep"]
