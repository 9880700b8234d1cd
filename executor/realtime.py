"""`pensieve run`: a scenario's workload served by the real engine in wall-clock time.

New conversations start at their arrival times; each next turn is sent when the previous
answer is complete plus the (time-scaled) think time. Every turn generates exactly its trace's
output length (EOS ignored) so that a real run and its simulation do the same work.
"""
from __future__ import annotations

import heapq
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pensieve.config import Scenario
from pensieve.outputs import atomic_open, prepare_folder
from pensieve.plots import plot_run
from pensieve.results import request_rows, summarize, write_results
from pensieve.workload import Workload, prompt_ids

from .cpu import ThreadGovernor, fixed_threads, torch_threads, tune_allocator
from .engine import Engine, EngineConfig
from .models import LoadedModel

TIMELINE_EVERY_S = 0.5


@dataclass
class RealRun:
    summary: dict
    finished: list
    timeline: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)  # per step: the plan's counts and its measured time
    outputs: list[dict] = field(default_factory=list)
    interrupted: bool = False


def engine_config(scenario: Scenario, policy: str | None = None) -> EngineConfig:
    """Every cache and scheduler setting of the scenario, for the engine's core (`policy` overrides the
    scenario's, and then the scenario's policy params are left out, as `build_scheduler` does)."""
    from pensieve.core import policy_params

    c = scenario.cache
    return EngineConfig(
        policy=policy or c.policy.type, policy_params=policy_params(scenario, policy), device_cache_gb=c.device_gb,
        host_cache_gb=c.host_gb, chunk_tokens=c.chunk_tokens, scheduler=scenario.scheduler, seed=scenario.seed,
    )


def step_record(plan, duration_s: float) -> dict:
    """What the replay check needs of a step: its composition and how long it really took."""
    return {
        "decodes": len(plan.decodes), "decode_context_tokens": plan.decode_context_tokens,
        "prefills": [[list(map(list, p.spans)), p.context_tokens] for p in plan.prefills],
        "swap_in": len(plan.swap_in), "swap_out": len(plan.swap_out), "duration_s": duration_s,
    }


def serve(scenario: Scenario, workload: Workload, loaded: LoadedModel, policy: str | None = None,
          progress: bool = True, cost_model=None, threads: int | None = None) -> RealRun:
    """Serve `workload` in wall-clock time; Ctrl-C stops and keeps the turns that finished.

    Think times are taken as given: scale them first (`scale_think_times`) to shorten a run.
    `threads`: torch intra-op threads while serving on the CPU (default: PENSIEVE_THREADS, else one
    for tiny models, else a `ThreadGovernor`: every core other processes leave free, re-checked every
    second); the caller's setting is restored afterwards.
    """
    governor = None
    if loaded.device.type == "cpu":
        tune_allocator()
        threads = fixed_threads(loaded.dims) if threads is None else threads
        governor = ThreadGovernor() if threads is None else None
    with torch_threads(threads):
        if governor is not None:
            governor.start()  # before the clock starts: it watches the machine for a moment
        return _serve(scenario, workload, loaded, policy, progress, cost_model, governor)


def _serve(scenario: Scenario, workload: Workload, loaded: LoadedModel, policy: str | None, progress: bool,
           cost_model, governor: ThreadGovernor | None) -> RealRun:
    engine = Engine(loaded, engine_config(scenario, policy), cost_model=cost_model)
    vocab = loaded.dims["vocab_size"]
    due: list[tuple[float, int, int]] = []  # (send time, conversation index, turn index)
    for index, conv in enumerate(workload.conversations):
        heapq.heappush(due, (conv.start_s, index, 0))
    steps: list[dict] = []
    timeline: list[dict] = []
    next_sample = 0.0
    bar = tqdm(total=workload.requests, desc=f"run {engine.cache.policy.name}", unit="req", disable=not progress)
    interrupted = False
    read_late: list[float] = []  # how long after its send time the loop read each turn (a step was running)
    waited = False  # the engine was idle before this step
    start = time.perf_counter()
    try:
        while due or not engine.scheduler.idle:
            now = time.perf_counter() - start
            while due and due[0][0] <= now:
                send, index, turn = heapq.heappop(due)
                conv = workload.conversations[index]
                spec = conv.turns[turn]
                # A turn arrives when it is sent, not when the loop gets to it after the step in
                # flight: its latency and TTFT include that wait, as the simulator's do.
                engine.add_request(conv.id, prompt_ids(scenario.seed, conv.id, turn, spec.prompt_tokens, vocab),
                                   spec.output_tokens, arrival=send, turn=turn)
                read_late.append(now - send)
            if engine.scheduler.idle:
                time.sleep(max(0.0, min(due[0][0] - now, 0.05)))
                waited = True
                continue
            if waited and governor is not None:
                governor.resume()
            waited = False
            plan, finished = engine.step(now)
            steps.append(step_record(plan, engine.last_step_s))
            if governor is not None:
                governor.step_done()
            done_at = time.perf_counter() - start
            for r in finished:
                conv = workload.conversations[_index(workload, r.conversation_id)]
                if r.turn + 1 < len(conv.turns):
                    heapq.heappush(due, (r.finish + conv.turns[r.turn + 1].think_s, _index(workload, conv.id),
                                         r.turn + 1))
            if finished:
                bar.update(len(finished))
            if done_at >= next_sample:
                timeline.append(_sample(engine, done_at))
                next_sample = done_at + TIMELINE_EVERY_S
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    wall = time.perf_counter() - start
    finished = engine.scheduler.finished
    cache = engine.cache
    summary = summarize(
        finished, "real", cache.policy.name, wall, cache.stats.swap_in_chunks, cache.stats.swap_out_chunks,
        cache.bytes_per_chunk,
        extra={"steps": len(steps), "dropped_chunks": cache.stats.dropped_chunks, "device": str(loaded.device),
               "model": loaded.name, "device_slots": cache.device.capacity, "host_slots": cache.host.capacity,
               "interrupted": interrupted, "unfinished": workload.requests - len(finished),
               "arrival_read_late_s": _spread(read_late),
               "threads": _threads_used(loaded, governor, len(steps))},
    )
    outputs = [{"conversation": r.conversation_id, "turn": r.turn,
                "prompt_ids": engine.conversation_ids(r.conversation_id)[_prompt_slice(engine, r)],
                "generated_ids": engine.generated_ids(r.id)} for r in sorted(finished, key=lambda r: r.id)]
    return RealRun(summary, finished, timeline, steps, outputs, interrupted)


def _spread(values: list[float]) -> dict[str, float]:
    """Mean, p90 and max of a list of seconds (zeros when empty)."""
    if not values:
        return {"mean": 0.0, "p90": 0.0, "max": 0.0}
    data = np.asarray(values)
    return {"mean": float(data.mean()), "p90": float(np.percentile(data, 90)), "max": float(data.max())}


def _threads_used(loaded: LoadedModel, governor: ThreadGovernor | None, steps: int) -> dict[str, int] | None:
    """Steps run at each torch thread count (CPU only)."""
    if loaded.device.type != "cpu":
        return None
    if governor is None:
        return {str(torch.get_num_threads()): steps}
    return {str(n): count for n, count in sorted(governor.steps.items())}


def _index(workload: Workload, conversation_id: str) -> int:
    index = workload.__dict__.setdefault("_index", {c.id: i for i, c in enumerate(workload.conversations)})
    return index[conversation_id]


def _prompt_slice(engine: Engine, request) -> slice:
    """Where a request's new prompt sits in its conversation's token ids."""
    start = engine.prompt_start[request.id]
    return slice(start, start + request.prompt_tokens)


def _sample(engine: Engine, now: float) -> dict:
    cache = engine.cache
    return {"time_s": now, "device_used": cache.device.used, "device_capacity": cache.device.capacity,
            "host_used": cache.host.used, "host_capacity": cache.host.capacity,
            "running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting)}


def write_run(out: Path, scenario: Scenario, run: RealRun) -> Path:
    """The results folder of a real run: DESIGN.md's files plus outputs.jsonl and steps.jsonl."""
    write_results(out, run.summary, run.finished, scenario.model_dump(), run.timeline)
    with atomic_open(out / "outputs.jsonl") as f:
        for row in run.outputs:
            f.write(json.dumps(row) + "\n")
    with atomic_open(out / "steps.jsonl") as f:
        for row in run.steps:
            f.write(json.dumps(row) + "\n")
    plot_run(out, run.summary, request_rows(run.finished), run.timeline)
    return out


def load_scenario_model(scenario: Scenario, source: str, device: str | None = None) -> LoadedModel:
    """The model a real run of `scenario` serves; its dimensions must be the scenario's."""
    from pensieve.models import DEFAULT_MODEL

    from .models import default_device, load_model

    if scenario.tensor_parallel > 1:
        raise ValueError(f"{source}: tensor_parallel: {scenario.tensor_parallel}: the real executor runs a model on "
                         "one device; tensor parallelism is simulated only (pensieve simulate / sweep)")
    name = scenario.run.model_path
    if name is None:
        if scenario.model.name != DEFAULT_MODEL:
            raise ValueError(f"{source}: run.model_path: say which weights serve model {scenario.model.name!r} "
                             "(a hub name, a folder, a .gguf file or random:<preset>)")
    loaded = load_model(name, device or scenario.run.device or default_device(), scenario.run.dtype)
    for key in ("layers", "kv_heads", "head_dim"):
        if loaded.dims[key] != getattr(scenario.model, key):
            raise ValueError(f"{source}: model: the scenario's {key} is {getattr(scenario.model, key)} but "
                             f"{loaded.name} has {loaded.dims[key]}; make the scenario's model match the weights")
    return loaded


def run_command(args) -> int:
    """`pensieve run SCENARIO [--policy P ...]`: serve the workload for real, once per policy, and compare."""
    from pensieve.cli import scenario_overrides
    from pensieve.config import load_scenario
    from pensieve.core import build_cost_model, rng_for
    from pensieve.results import SUMMARY_COLUMNS, format_table, summary_row
    from pensieve.workload import build_workload, scale_think_times

    scenario = load_scenario(args.scenario, scenario_overrides(args))
    workload = scale_think_times(build_workload(scenario.workload, rng_for(scenario)), scenario.run.time_scale)
    policies = [p for group in (args.policy or [scenario.cache.policy.type]) for p in group.split(",")]
    base = Path(args.out or Path("results") / f"{scenario.name}-real")
    # every results folder checked before the model loads
    folders = {p: prepare_folder(base / p if len(policies) > 1 else base, args.force, inputs=(args.scenario,))
               for p in policies}
    loaded = load_scenario_model(scenario, args.scenario, args.device)
    cost = build_cost_model(scenario, args.scenario)
    rows, status = [], 0
    for policy in policies:
        run = serve(scenario, workload, loaded, policy, progress=not args.quiet, cost_model=cost)
        out = folders[policy]
        write_run(out, scenario, run)
        rows.append(summary_row(run.summary, wall_s=run.summary["wall_s"],
                                tokens=run.summary["tokens"]["generated"] + run.summary["tokens"]["new_prompt"]))
        print(f"{policy}: results in {out}/")
        if run.interrupted:
            status = 130
            break
    for row in rows:
        row["speedup"] = rows[-1]["wall_s"] / row["wall_s"] if row["wall_s"] else 0.0
    columns = [("wall s", "wall_s")] + SUMMARY_COLUMNS
    if len(rows) > 1:
        columns.append((f"speedup vs {rows[-1]['policy']}", "speedup"))
    print(format_table(rows, columns))
    return status
