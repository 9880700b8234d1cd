"""`pensieve validate`: one workload run for real and in simulation, and how far apart they are.

Both sides get the same workload, seed, policy and cache sizes; nothing in the simulation reads
the real run's timings. Separately, the real run's own step plans are replayed through the cost
model, which isolates the per-step prediction error from scheduling divergence.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pensieve.config import Scenario, load_scenario
from pensieve.cli import scenario_overrides
from pensieve.core import build_cost_model, rng_for
from pensieve.cost import ScaledCostModel
from pensieve.plan import PrefillItem, StepPlan
from pensieve.profile import device_type
from pensieve.outputs import prepare_folder
from pensieve.results import format_table, normalized_latency_ms, ttft_s, write_text
from pensieve.workload import build_workload, scale_think_times

from .driver import simulate

# (label, path into summary.json, how it is compared)
METRICS = [
    ("throughput (req/s)", ("throughput_rps",), "relative"),
    ("output tokens/s", ("output_tokens_per_s",), "relative"),
    ("norm. latency mean (ms)", ("normalized_latency_ms", "mean"), "relative"),
    ("norm. latency p50 (ms)", ("normalized_latency_ms", "p50"), "relative"),
    ("norm. latency p90 (ms)", ("normalized_latency_ms", "p90"), "relative"),
    ("TTFT mean (s)", ("ttft_s", "mean"), "relative"),
    ("TTFT p90 (s)", ("ttft_s", "p90"), "relative"),
    ("device hit rate", ("hit_rate", "gpu"), "points"),
    ("host hit rate", ("hit_rate", "cpu"), "points"),
    ("miss rate", ("hit_rate", "miss"), "points"),
    ("recomputed tokens", ("tokens", "recomputed"), "relative"),
    ("swap-in bytes", ("swap_bytes", "in"), "relative"),
    ("swap-out bytes", ("swap_bytes", "out"), "relative"),
    ("suspensions", ("suspensions",), "count"),
]
# Step kinds the replay is broken down by: a step with copies is "with swaps" whatever else it runs.
STEP_KINDS = ("decode-only", "prefill-only", "mixed", "with swaps")


# The gate `validate` applies by default (--max-error): throughput and mean normalized latency,
# simulated against real. It is written into validation.json with the verdict.
DEFAULT_MAX_ERROR = 0.10
GATED = ("throughput (req/s)", "norm. latency mean (ms)")
# The targets drawn on validation_errors.png (% for relative metrics, points for rates).
TARGETS = {"throughput (req/s)": 5.0, "norm. latency mean (ms)": 5.0, "norm. latency p90 (ms)": 10.0,
           "TTFT mean (s)": 10.0, "device hit rate": 1.0, "host hit rate": 1.0, "miss rate": 1.0}
# A machine-speed probe further than this from 1 means the machine is not the one the profile measured.
SPEED_WARNING = 0.10


def real_spread(summaries: list[dict]) -> list[dict]:
    """Per metric, how far the real runs of one scenario fall apart: max - min, relative to their mean
    (points for rates, a count for counts). One run has no spread (None)."""
    rows = []
    for label, path, kind in METRICS:
        values = [_get(s, path) for s in summaries]
        spread = None
        if len(values) > 1:
            width = max(values) - min(values)
            mean = float(np.mean(values))
            spread = width * 100 if kind == "points" else width if kind == "count" else \
                (width / mean if mean else 0.0)
        rows.append({"metric": label, "kind": kind, "runs": len(values), "values": values, "spread": spread})
    return rows


def metric_verdicts(comparison: list[dict], spread: list[dict]) -> list[dict]:
    """Per metric: within its target, within the real runs' own spread, or neither."""
    rows = []
    for row, noise in zip(comparison, spread):
        target = TARGETS.get(row["metric"])
        size = abs(row["error"]) * (100 if row["kind"] == "relative" else 1)
        noise_size = None if noise["spread"] is None else noise["spread"] * (100 if row["kind"] == "relative" else 1)
        if target is not None and size <= target:
            said = "within target"
        elif noise_size is not None and size <= noise_size:
            said = "within the real runs' spread"
        else:
            said = "neither" if target is not None else "no target"
        rows.append({"metric": row["metric"], "error": row["error"], "target": target,
                     "real_spread": noise["spread"], "verdict": said})
    return rows


def verdict(result: dict, max_error: float) -> dict:
    """Whether the gated errors are within `max_error`, plainly and at machine speed (if probed)."""
    def worst(rows: list[dict]) -> float:
        return max(abs(r["error"]) for r in rows if r["metric"] in GATED)

    plain = worst(result["comparison"])
    out = {"max_error": max_error, "gated": list(GATED), "worst": plain, "passes": plain <= max_error}
    if "comparison_at_machine_speed" in result:
        at_speed = worst(result["comparison_at_machine_speed"])
        out |= {"worst_at_machine_speed": at_speed, "passes_at_machine_speed": at_speed <= max_error}
    return out


def speed_warnings(result: dict) -> list[str]:
    """A line for each probe (before, after) that finds the machine more than 10% off the profile's speed."""
    speed = result.get("machine_speed")
    if not speed:
        return []
    return [f"WARNING: the machine ran the profile's grid-point steps at x{speed[when]['factor']:.3f} of their "
            f"profiled time {when} the real run (more than {SPEED_WARNING:.0%} off): timings compare this "
            "machine now with the one profiled; see the comparison at machine speed, or re-profile"
            for when in ("before", "after") if abs(speed[when]["factor"] - 1) > SPEED_WARNING]


def _get(summary: dict, path: tuple) -> float:
    value = summary
    for key in path:
        value = value[key]
    return float(value)


def compare_summaries(real: dict, sim: dict) -> list[dict]:
    """Per metric: real, simulated, and the error (relative, or percentage points for rates)."""
    rows = []
    for label, path, kind in METRICS:
        r, s = _get(real, path), _get(sim, path)
        if kind == "points":
            error = (s - r) * 100
        elif kind == "count":
            error = s - r
        else:
            error = (s - r) / r if r else (0.0 if s == 0 else float("inf"))
        rows.append({"metric": label, "real": r, "sim": s, "kind": kind, "error": error})
    return rows


def plan_of(record: dict) -> StepPlan:
    """A StepPlan with the counts of a recorded real step (ids are irrelevant to the cost model)."""
    prefills = [PrefillItem(i, i, [tuple(span) for span in spans], context) for i, (spans, context)
                in enumerate(record["prefills"])]
    return StepPlan(0, [0] * record["decodes"], record["decode_context_tokens"], prefills,
                    [(0, 0)] * record["swap_out"], [(0, 0)] * record["swap_in"])


def replay_errors(steps: list[dict], cost, chunk_tokens: int) -> dict:
    """Absolute percentage error of the cost model's step time against each measured real step."""
    measured = np.array([s["duration_s"] for s in steps])
    predicted = np.array([cost.step_time_s(plan_of(s), chunk_tokens) for s in steps])
    ape = np.abs(predicted - measured) / np.maximum(measured, 1e-9)
    kinds = np.array([step_kind(s) for s in steps])
    by_kind = {}
    for kind in STEP_KINDS:
        part = ape[kinds == kind] if len(steps) else ape
        by_kind[kind] = {"steps": int(len(part)), "median_ape": float(np.median(part)) if len(part) else None,
                         "p90_ape": float(np.percentile(part, 90)) if len(part) else None}
    return {"steps": len(steps), "median_ape": float(np.median(ape)) if len(ape) else 0.0,
            "p90_ape": float(np.percentile(ape, 90)) if len(ape) else 0.0,
            "measured_total_s": float(measured.sum()), "predicted_total_s": float(predicted.sum()),
            "by_kind": by_kind, "_measured": measured.tolist(), "_predicted": predicted.tolist()}


def step_kind(record: dict) -> str:
    """decode-only, prefill-only, mixed (both), or with swaps (any copy, whatever else it runs)."""
    if record["swap_in"] or record["swap_out"]:
        return "with swaps"
    if not record["prefills"]:
        return "decode-only"
    return "prefill-only" if not record["decodes"] else "mixed"


def per_turn(real: list, sim: list) -> list[dict]:
    """Per turn index: requests, mean TTFT and mean normalized latency, real against simulated."""
    def means(requests: list) -> dict[int, tuple[int, float, float]]:
        by_turn: dict[int, list] = {}
        for r in requests:
            by_turn.setdefault(r.turn, []).append(r)
        return {turn: (len(rs), float(np.mean([ttft_s(r) for r in rs])),
                       float(np.mean([normalized_latency_ms(r) for r in rs])))
                for turn, rs in by_turn.items()}

    real_means, sim_means = means(real), means(sim)
    rows = []
    for turn in sorted(set(real_means) | set(sim_means)):
        (rn, rt, rl), (sn, st, sl) = real_means.get(turn, (0, 0.0, 0.0)), sim_means.get(turn, (0, 0.0, 0.0))
        rows.append({"turn": turn, "requests_real": rn, "requests_sim": sn, "ttft_real_s": rt, "ttft_sim_s": st,
                     "ttft_error": (st - rt) / rt if rn and sn and rt else None, "latency_real_ms": rl,
                     "latency_sim_ms": sl, "latency_error": (sl - rl) / rl if rn and sn and rl else None})
    return rows


def check_profile_device(profile, real_device: str, source: str) -> None:
    """Refuse a profile measured on another kind of device than the real run uses (a CPU profile for a
    CUDA run, or the reverse). Kinds, not names: a GPU profile is named after the GPU."""
    kind = "cuda" if real_device.startswith("cuda") else "cpu"
    measured_on = device_type(profile)
    if measured_on != kind:
        raise ValueError(f"{source}: profile: measured on {profile.device!r} ({measured_on}) but the real run uses "
                         f"{real_device!r}; profile this device first (pensieve profile) and name that profile")


def profiled_threads(cost, device_type: str) -> int | None:
    """The CPU thread count the profile was measured with: the real run must compute the same way,
    or the comparison measures the thread setting rather than the simulator (None: not recorded)."""
    profile = getattr(cost, "profile", None)
    if device_type != "cpu" or profile is None:
        return None
    threads = profile.data.get("runtime", {}).get("torch_threads")
    return int(threads) if threads else None


def validate(scenario: Scenario, source: str, progress: bool = True, device: str | None = None,
             speed_probe: bool = True, repeats: int = 1) -> dict:
    """Run the scenario both ways; the comparison, the replay check and both summaries.

    The real side runs `repeats` times (same seed, same workload): the first run is the one compared
    and replayed, and the spread of all of them per metric is the real runs' own noise floor.

    With `speed_probe` (a measured profile), grid-point steps are timed just before and after the
    real run; their measured / predicted ratio is the machine's speed now against the profile's. The
    simulation is then run a second time with the profile scaled by it, and compared separately.
    """
    from executor.cpu import serving_threads, torch_threads, tune_allocator
    from executor.profiling.speed import machine_speed
    from executor.realtime import load_scenario_model, serve

    if not scenario.profile:
        raise ValueError(f"{source}: profile: validation needs the profile of the device and model it runs on")
    cost = build_cost_model(scenario, source)
    profile = getattr(cost, "profile", None)
    if profile is not None and profile.source != "measured":
        raise ValueError(f"{source}: profile: {scenario.profile} is {profile.source}; validate against a "
                         "measured profile of this device")
    loaded = load_scenario_model(scenario, source, device)
    if profile is not None:
        check_profile_device(profile, str(loaded.device), source)
    threads = None
    if loaded.device.type == "cpu":
        # Probes, real run and profile must compute alike: the same allocator settings, and one fixed
        # thread count (the profile's, else the engine's default), never the thread governor.
        tune_allocator()
        threads = profiled_threads(cost, "cpu") or serving_threads(loaded.dims)
    workload = scale_think_times(build_workload(scenario.workload, rng_for(scenario)), scenario.run.time_scale)
    probe = speed_probe and profile is not None
    speeds = []
    if probe:
        with torch_threads(threads):
            speeds.append(machine_speed(profile, loaded))
    real = serve(scenario, workload, loaded, progress=progress, cost_model=cost, threads=threads)
    head = {"scenario": scenario.name, "policy": scenario.cache.policy.type, "device": str(loaded.device),
            "profile": scenario.profile}
    stopped = head | {"interrupted": True, "real": real.summary, "_real_run": real, "_more_real_runs": []}
    if real.interrupted:  # keep the real turns that finished; a comparison with a part would mislead
        return stopped
    more = stopped["_more_real_runs"]
    try:  # Ctrl-C from here on still keeps the whole first real run (and the repeats that finished)
        for _ in range(repeats - 1):
            again = serve(scenario, workload, loaded, progress=progress, cost_model=cost, threads=threads)
            if again.interrupted:
                return stopped
            more.append(again)
        if probe:
            with torch_threads(threads):
                speeds.append(machine_speed(profile, loaded))
        sim = simulate(scenario, workload, cost, progress=progress)
        if sim.interrupted:
            return stopped
        replay = replay_errors(real.steps, cost, scenario.cache.chunk_tokens)
        result = head | {"comparison": compare_summaries(real.summary, sim.summary), "replay": replay,
                         "real_spread": real_spread([real.summary] + [r.summary for r in more]),
                         "_more_real_runs": more,
                         "per_turn": per_turn(real.finished, sim.finished),
                         "real": real.summary, "sim": sim.summary, "_real_run": real, "_sim_run": sim}
        if speeds:
            factor = float(np.mean([s["factor"] for s in speeds]))
            scaled = ScaledCostModel(cost, factor)
            adjusted = simulate(scenario, workload, scaled, progress=progress)
            if adjusted.interrupted:
                return stopped
            result["machine_speed"] = {"factor": factor, "before": speeds[0], "after": speeds[1]}
            result["comparison_at_machine_speed"] = compare_summaries(real.summary, adjusted.summary)
            result["replay_at_machine_speed"] = replay_errors(real.steps, scaled, scenario.cache.chunk_tokens)
            result["sim_at_machine_speed"] = adjusted.summary
            result["per_turn_at_machine_speed"] = per_turn(real.finished, adjusted.finished)
        # Open loop: every turn sent when the real run sent it, so a gap left in cache behaviour is
        # the cache model's, not a slower or faster clock's (at machine speed when probed).
        clock = ScaledCostModel(cost, result["machine_speed"]["factor"]) if speeds else cost
        opened = simulate(scenario, workload, clock, progress=progress,
                          send_at={(r.conversation_id, r.turn): r.arrival for r in real.finished})
        if opened.interrupted:
            return stopped
        result["open_loop"] = {"machine_speed_factor": result["machine_speed"]["factor"] if speeds else 1.0,
                               "comparison": compare_summaries(real.summary, opened.summary),
                               "sim": opened.summary}
    except KeyboardInterrupt:
        return stopped
    return result


def write_validation(out: Path, result: dict, scenario: Scenario) -> Path:
    """validation.json, both results folders, and two plots."""
    from executor.realtime import write_run
    from pensieve.plots import plot_run
    from pensieve.results import request_rows, write_results

    out.mkdir(parents=True, exist_ok=True)
    write_run(out / "real", scenario, result["_real_run"])
    for i, again in enumerate(result.get("_more_real_runs", ()), 2):
        write_run(out / f"real-{i}", scenario, again)
    if result.get("interrupted"):
        public = {k: v for k, v in result.items() if not k.startswith("_")}
        write_text(out / "validation.json", json.dumps(public, indent=2, default=float) + "\n")
        return out
    sim = result["_sim_run"]
    write_results(out / "sim", sim.summary, sim.finished, scenario.model_dump(), sim.timeline)
    plot_run(out / "sim", sim.summary, request_rows(sim.finished), sim.timeline)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    for key in ("replay", "replay_at_machine_speed"):
        if key in public:
            public[key] = {k: v for k, v in result[key].items() if not k.startswith("_")}
    write_text(out / "validation.json", json.dumps(public, indent=2, default=float) + "\n")
    _plot(out, result)
    return out


def _plot(out: Path, result: dict) -> None:
    from pensieve.plots import _pyplot, _save

    plt = _pyplot()
    rows = result["comparison"]
    fig, ax = plt.subplots(figsize=(8, 5))
    labels = [r["metric"] for r in rows]
    y = np.arange(len(rows))
    for i, r in enumerate(rows):  # the target band of each metric that has one
        band = TARGETS.get(r["metric"])
        if band is not None:
            ax.fill_betweenx([i - 0.45, i + 0.45], -band, band, color="tab:green", alpha=0.15, linewidth=0)
    scale = [100 if r["kind"] == "relative" else 1 for r in rows]  # counts and points as they are
    adjusted = result.get("comparison_at_machine_speed")
    height = 0.4 if adjusted else 0.8
    ax.barh(y - (height / 2 if adjusted else 0), [r["error"] * s for r, s in zip(rows, scale)], height=height,
            color="tab:blue", label="plain")
    if adjusted:
        ax.barh(y + height / 2, [r["error"] * s for r, s in zip(adjusted, scale)], height=height, color="tab:orange",
                label=f"at machine speed (x{result['machine_speed']['factor']:.2f})")
    ax.set_yticks(y, labels)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("simulated - real (% relative; percentage points for rates); green: target")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"validation: {result['scenario']} ({result['policy']})")
    _save(fig, out / "validation_errors.png")
    replay = result["replay"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(np.array(replay["_measured"]) * 1e3, np.array(replay["_predicted"]) * 1e3, s=6, alpha=0.5)
    top = max(replay["_measured"] + replay["_predicted"] + [1e-3]) * 1e3
    ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
    ax.set_xlabel("measured step time (ms)")
    ax.set_ylabel("predicted step time (ms)")
    ax.set_title(f"replay: median error {replay['median_ape']:.1%}")
    _save(fig, out / "step_time_replay.png")


def _relative(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1%}"


def _error_text(row: dict, signed: bool = True) -> str:
    sign = "+" if signed else ""
    if row["kind"] == "count":
        return f"{row['error']:{sign}.0f}"
    return f"{row['error']:{sign}.1%}" if row["kind"] == "relative" else f"{row['error']:{sign}.2f} pt"


def validate_command(args) -> int:
    scenario = load_scenario(args.scenario, scenario_overrides(args))
    out = prepare_folder(args.out or Path("results") / f"{scenario.name}-validate", args.force,
                         inputs=(args.scenario,))  # before the work
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    sides = ["real", "sim"] + sorted({f"real-{i}" for i in range(2, args.repeats + 1)}
                                     | {p.name for p in out.glob("real-*") if p.is_dir()})  # stale repeats too
    for side in sides:  # each side's results folder, checked the same way (created when written)
        if (out / side).exists():
            prepare_folder(out / side, args.force, option=f"--out {out}: its {side}/ folder")
    result = validate(scenario, args.scenario, progress=not args.quiet, device=args.device,
                      speed_probe=not args.no_speed_probe, repeats=args.repeats)
    if not result.get("interrupted"):
        result["verdict"] = verdict(result, DEFAULT_MAX_ERROR if args.max_error is None else args.max_error)
        result["metric_verdicts"] = metric_verdicts(result["comparison"], result["real_spread"])
        if "comparison_at_machine_speed" in result:
            result["metric_verdicts_at_machine_speed"] = metric_verdicts(result["comparison_at_machine_speed"],
                                                                         result["real_spread"])
    write_validation(out, result, scenario)
    if result.get("interrupted"):
        print(f"interrupted: wrote the {result['real']['requests']} real turns that finished to {out}/real/ "
              "(all of them if the real run had ended); no comparison was made")
        return 130
    adjusted = result.get("comparison_at_machine_speed")
    table = []
    noise = result["real_spread"]
    said = result["metric_verdicts"]
    for i, r in enumerate(result["comparison"]):
        row = {"metric": r["metric"], "real": r["real"], "sim": r["sim"], "error": _error_text(r),
               "spread": "n/a" if noise[i]["spread"] is None else _error_text({**r, "error": noise[i]["spread"]}, signed=False),
               "verdict": said[i]["verdict"]}
        if adjusted:
            row |= {"sim_speed": adjusted[i]["sim"], "error_speed": _error_text(adjusted[i]),
                    "verdict_speed": result["metric_verdicts_at_machine_speed"][i]["verdict"]}
        table.append(row)
    columns = [("metric", "metric"), ("real", "real"), ("real runs' spread", "spread"), ("sim", "sim"),
               ("sim vs real", "error"), ("verdict", "verdict")]
    if adjusted:
        columns += [("sim at machine speed", "sim_speed"), ("vs real", "error_speed"), ("verdict", "verdict_speed")]
    print(format_table(table, columns))
    replay = result["replay"]
    print(f"step-time replay over {replay['steps']} real steps: median error {replay['median_ape']:.1%}, "
          f"p90 {replay['p90_ape']:.1%}; by kind: " + ", ".join(
              f"{kind} {part['median_ape']:.1%} ({part['steps']})" for kind, part in replay["by_kind"].items()
              if part["steps"]))
    opened = result["open_loop"]
    cache_rows = {r["metric"]: _error_text(r) for r in opened["comparison"]
                  if r["metric"] in ("device hit rate", "host hit rate", "miss rate", "swap-in bytes", "suspensions")}
    print(f"open loop (turns sent at the real run's send times, clock x{opened['machine_speed_factor']:.3f}): "
          + ", ".join(f"{metric} {error}" for metric, error in cache_rows.items()))
    turns = [{**row, "ttft": _relative(row["ttft_error"]), "latency": _relative(row["latency_error"])}
             for row in result["per_turn"]]
    print("per turn index (simulated against real):")
    print(format_table(turns, [("turn", "turn"), ("requests real", "requests_real"), ("sim", "requests_sim"),
                               ("TTFT real s", "ttft_real_s"),
                               ("TTFT sim s", "ttft_sim_s"), ("TTFT error", "ttft"),
                               ("latency real ms", "latency_real_ms"), ("latency sim ms", "latency_sim_ms"),
                               ("latency error", "latency")]))
    if adjusted:
        speed = result["machine_speed"]
        again = result["replay_at_machine_speed"]
        print(f"machine speed against the profile (measured / predicted at grid points): "
              f"x{speed['before']['factor']:.3f} before the run, x{speed['after']['factor']:.3f} after; "
              f"at x{speed['factor']:.3f} the replay's median error is {again['median_ape']:.1%}, "
              f"p90 {again['p90_ape']:.1%}")
    for line in speed_warnings(result):
        print(line)
    gate = result["verdict"]
    print(f"results: {out}/")
    if not gate["passes"]:
        also = ""
        if "passes_at_machine_speed" in gate:
            also = (f"; at machine speed {gate['worst_at_machine_speed']:.1%} "
                    f"({'within' if gate['passes_at_machine_speed'] else 'also over'} it)")
        print(f"FAIL: throughput / mean latency error {gate['worst']:.1%} exceeds {gate['max_error']:.0%} "
              f"(--max-error){also}")
        return 1
    return 0
