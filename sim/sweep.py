"""Sweeps: scenario points run in parallel processes (or on a Ray cluster), and throughput at a
latency target found by bisection over arrival rates, the paper's headline metric."""
from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from pensieve.config import Scenario, parse_scenario
from pensieve.core import build_cost_model, rng_for
from pensieve.results import summary_row, write_results
from pensieve.signals import ignore_interrupts
from pensieve.workload import build_workload

from .driver import simulate


def run_point(scenario_data: dict, source: str, point: dict, keep: str | None = None) -> dict:
    """Simulate one scenario (given as plain data so it crosses process boundaries); a table row whose
    summary records the point's sweep parameters. With `keep`, the point's summary.json, requests.csv and
    scenario.yaml are written into that folder. An interrupted simulation is no point of the sweep: the
    interrupt goes on up."""
    scenario = parse_scenario(scenario_data, source)
    workload = build_workload(scenario.workload, rng_for(scenario))
    run = simulate(scenario, workload, build_cost_model(scenario, source), progress=False)
    if run.interrupted:
        raise KeyboardInterrupt  # SIGTERM's Terminated was turned into `interrupted` the same way
    summary = {**run.summary, "sweep_point": point}
    if keep:
        write_results(keep, summary, run.finished, scenario.model_dump())
    return {**summary_row(summary, **point), "arrival_rate": scenario.workload.arrival_rate, "summary": summary}


def run_points(points: list[tuple[dict, Scenario]], source: str, jobs: int, ray_address: str | None = None,
               progress=None, rows: list[dict] | None = None, keep: Path | None = None) -> list[dict]:
    """Every point of a sweep, in parallel; rows are appended to `rows` in the points' order as they
    finish, so that an interrupted sweep keeps exactly the points that finished (the interrupt
    propagates after the workers are ended). With `keep`, point i's results go to `keep/<i>/`."""
    rows = [] if rows is None else rows
    payloads = [(scenario.model_dump(), source, point, str(keep / f"{i:04d}") if keep else None)
                for i, (point, scenario) in enumerate(points)]
    if ray_address:
        rows += _run_on_ray(payloads, ray_address, progress)
        return rows
    if jobs <= 1 or len(payloads) == 1:
        for payload in payloads:
            rows.append(run_point(*payload))
            if progress:
                progress.update(1)
        return rows
    with worker_pool(jobs) as pool:
        futures = [pool.submit(run_point, *payload) for payload in payloads]
        done: dict[int, dict] = {}
        try:
            for i, future in enumerate(futures):
                done[i] = future.result()
                if progress:
                    progress.update(1)
        except KeyboardInterrupt:
            # points that finished out of order are kept too
            for i, future in enumerate(futures):
                if i not in done and future.done() and not future.cancelled() and future.exception() is None:
                    done[i] = future.result()
            raise
        finally:
            rows += [done[i] for i in sorted(done)]
    return rows


@contextmanager
def worker_pool(jobs: int):
    """A process pool whose workers leave interrupts to this process; on an interrupt (or any
    error) the workers are ended at once rather than left to finish their points."""
    pool = ProcessPoolExecutor(max_workers=jobs, initializer=ignore_interrupts)
    try:
        yield pool
    except BaseException:
        _end_workers(pool)
        raise
    else:
        pool.shutdown(wait=True)


def _end_workers(pool: ProcessPoolExecutor) -> None:
    # The executor has no public way to stop running work: kill its processes (they ignore SIGTERM),
    # then shut it down without waiting.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=5)


def _run_on_ray(payloads: list[tuple], address: str, progress) -> list[dict]:
    """Run the points as Ray tasks on an existing cluster (`ray start --head` prints its address)."""
    try:
        import ray
    except ImportError as exc:
        raise ValueError("--ray needs the ray package: pip install 'ray[default]'") from exc
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(run_point)
    refs = [remote.remote(*payload) for payload in payloads]
    rows = []
    for ref in refs:
        rows.append(ray.get(ref))
        if progress:
            progress.update(1)
    return rows


def throughput_at_target(scenario: Scenario, source: str, target_ms: float, iterations: int = 6,
                         metric: str = "mean") -> dict:
    """The largest arrival rate whose normalized latency (`metric`: mean or p90) stays under target.

    Doubles or halves from the scenario's rate to bracket the target, then bisects; returns the
    best passing point's row (with its measured throughput) and the rates tried.
    """
    tried: list[dict] = []

    def evaluate(rate: float) -> dict:
        data = scenario.model_dump(exclude={"sweep"})
        data["workload"]["arrival_rate"] = rate
        row = run_point(data, source, {"policy": scenario.cache.policy.type})
        row["passes"] = row["summary"]["normalized_latency_ms"][metric] <= target_ms
        tried.append(row)
        return row

    rate = scenario.workload.arrival_rate
    if math.isinf(rate):
        raise ValueError(f"{source}: workload.arrival_rate must be finite to search for the throughput at a target")
    row = evaluate(rate)
    lo, hi = (row, None) if row["passes"] else (None, row)
    for _ in range(12):
        if lo is not None and hi is not None:
            break
        rate = rate * 2 if hi is None else rate / 2
        row = evaluate(rate)
        if row["passes"]:
            lo = row if lo is None or rate > lo["arrival_rate"] else lo
        else:
            hi = row if hi is None or rate < hi["arrival_rate"] else hi
    if lo is None:
        return {"policy": scenario.cache.policy.type, "best": None, "tried": tried}
    for _ in range(iterations if hi is not None else 0):
        mid = math.sqrt(lo["arrival_rate"] * hi["arrival_rate"])
        row = evaluate(mid)
        if row["passes"]:
            lo = row
        else:
            hi = row
    return {"policy": scenario.cache.policy.type, "best": lo, "tried": tried}
