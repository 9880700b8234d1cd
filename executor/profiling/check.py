"""`pensieve profile --check`: off-grid mixed batches, measured against what a profile predicts."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from executor.cpu import tune_allocator
from executor.profiling.device import device_name
from executor.profiling.harness import Bench, probe_bandwidth
from executor.profiling.memory import chunk_bytes, load_for_profiling, model_name_of
from executor.runner import SeqInput
from pensieve.models import DEFAULT_MODEL, ModelSpec
from pensieve.plan import PrefillItem, StepPlan
from pensieve.profile import (
    Profile,
    ProfileCostModel,
    ProfileError,
    check_profile_matches,
    held_out_errors,
    prefill_points,
)

CHECK_SEED = 1234


@dataclass
class CheckBatch:
    """A mixed step off the profile's grid: prefills (query spans, KV length after), decodes (KV length
    after each), and chunks swapped in and out before the forward."""

    label: str
    prefills: list[tuple[list[tuple[int, int]], int]]
    decodes: list[int]
    swap_in: int = 0
    swap_out: int = 0

    @property
    def tokens(self) -> int:
        return len(self.decodes) + sum(n for spans, _ in self.prefills for _, n in spans)


@dataclass
class CheckRow:
    """A check step: measured, predicted from its StepPlan, and predicted as if the plan gave the decodes'
    longest context (the executor pads every decode to it; a StepPlan only carries their sum)."""

    batch: CheckBatch
    measured_s: float
    predicted_s: float
    padded_s: float
    anchor: bool = False  # a grid point, measuring the machine's drift since profiling, not the model
    interpolated_s: float | None = None  # predicted with the interpolated prefill surface (None: no table)

    @property
    def error(self) -> float:
        return abs(self.predicted_s - self.measured_s) / self.measured_s

    @property
    def padded_error(self) -> float:
        return abs(self.padded_s - self.measured_s) / self.measured_s


def check_batches(profile: Profile, count: int, seed: int = CHECK_SEED) -> list[CheckBatch]:
    """Seeded compositions inside the profile's ranges but off its power-of-two points: fresh prefills,
    resumed conversations (recomputed leading chunks + a new prompt after the history, part of the history
    swapped in), decodes of spread contexts, and ahead-of-time swap-outs."""
    rng = random.Random(seed)
    t, chunk = profile.tables, profile.chunk_tokens
    max_kv = max(t["chunk_attention_s"])
    max_query = max(t.get("prefill_attention_s", {chunk * 4: None}))
    max_decodes = max(t["decode_attention_s"])

    def fresh() -> tuple[list[tuple[int, int]], int]:
        n = rng.randrange(chunk + 1, max(int(0.9 * max_query), chunk + 2))
        return [(0, n)], n

    def resumed() -> tuple[list[tuple[int, int]], int, int]:
        history = rng.randrange(2 * chunk, max(int(0.6 * max_kv), 2 * chunk + 1))
        dropped = chunk * rng.randint(1, max(1, history // chunk // 3))
        prompt = rng.randrange(chunk // 2 + 1, max(max_query // 2, chunk // 2 + 2))
        swap_in = rng.randint(1, max(1, min(16, (history - dropped) // chunk)))
        return [(0, dropped), (history, prompt)], history + prompt, swap_in

    def decodes(most: int) -> list[int]:
        center = rng.uniform(2 * chunk, 0.6 * max_kv)
        return [int(min(max(center * rng.uniform(0.7, 1.3), chunk), 0.8 * max_kv))
                for _ in range(rng.randint(2, max(2, most)))]

    def long() -> tuple[list[tuple[int, int]], int]:
        """A whole-history prefill past the table's last row, as `stateless` runs them: surfaces extrapolate."""
        ctx = rng.randrange(max_query + 2 * chunk, max(int(0.5 * max_kv), max_query + 2 * chunk + 1))
        if rng.random() < 0.5:
            return [(0, ctx)], ctx
        kept, prompt = chunk * rng.randint(1, 4), rng.randrange(chunk // 2 + 1, chunk * 2)  # most history dropped
        return [(0, ctx - kept - prompt), (ctx - prompt, prompt)], ctx

    batches = []
    for i in range(count):
        kind = i % 7
        if kind == 0:
            batches.append(CheckBatch("prefill + decodes", [fresh()], decodes(max_decodes)))
        elif kind == 1:
            spans, ctx, k = resumed()
            batches.append(CheckBatch("resume + decodes, swap-in", [(spans, ctx)], decodes(max_decodes), k))
        elif kind == 2:
            spans, ctx, k = resumed()
            batches.append(CheckBatch("prefill + resume + decodes", [fresh(), (spans, ctx)],
                                      decodes(max_decodes // 2), k))
        elif kind == 3:
            batches.append(CheckBatch("decodes", [], decodes(max_decodes)))
        elif kind == 4:
            spans, ctx, k = resumed()
            batches.append(CheckBatch("resume, swap-in + swap-out", [(spans, ctx)], [], k, rng.randint(2, 12)))
        elif kind == 5:
            batches.append(CheckBatch("2 prefills + decodes", [fresh(), fresh()], decodes(max_decodes // 2)))
        else:
            spans, ctx = long()
            batches.append(CheckBatch("long prefill past the rows", [(spans, ctx)], decodes(max_decodes // 4)))
    return batches


def anchor_batches(profile: Profile) -> list[CheckBatch]:
    """Prefills at three of the profile's own grid points: their predictions are table values, so measured
    over predicted says how much faster or slower the machine runs now than while it was profiled."""
    t, chunk = profile.tables, profile.chunk_tokens
    kv = sorted(t["chunk_attention_s"])
    query = min(t.get("prefill_attention_s", {4 * chunk: None}))
    points = [(query, query), (chunk, kv[len(kv) // 2]), (query, kv[-2])]
    return [CheckBatch(f"grid point {q} @ {L}", [([(L - q, q)], L)], []) for q, L in points]


def lay_out(batch: CheckBatch, bench: Bench, host_slots: int) -> tuple[list[SeqInput], list, list]:
    """Sequences with distinct scattered slots, and the copy pairs (the swap-ins fill a resumed history)."""
    chunk, free = bench.chunk, iter(bench.slots)
    seqs, tables = [], []
    for ctx in batch.decodes:
        table = [next(free) for _ in range(-(-ctx // chunk))]
        seqs.append(bench.sequence([ctx - 1], ctx, table))
    for spans, ctx in batch.prefills:
        table = [next(free) for _ in range(-(-ctx // chunk))]
        tables.append((spans, table))
        seqs.append(bench.sequence([p for s, n in spans for p in range(s, s + n)], ctx, table))
    host = iter(range(0, host_slots, 2))
    swap_in = []
    if batch.swap_in:
        spans, table = tables[-1]
        first = -(-spans[0][1] // chunk)  # the first chunk after the recomputed ones
        swap_in = [(next(host), table[first + j]) for j in range(batch.swap_in)]
    swap_out = [(next(free), next(host)) for _ in range(batch.swap_out)]
    return seqs, swap_out, swap_in


def check_plan(i: int, batch: CheckBatch, swap_out: list, swap_in: list, padded: bool = False) -> StepPlan:
    prefills = [PrefillItem(1000 + j, j, spans, ctx) for j, (spans, ctx) in enumerate(batch.prefills)]
    n = len(batch.decodes)
    context = n * max(batch.decodes, default=0) if padded else sum(batch.decodes)
    return StepPlan(i, list(range(n)), context, prefills, swap_out, swap_in)


def run_check(profile: Profile, args: Any, device: torch.device) -> list[CheckRow]:
    """Measure off-grid mixed steps on the real runner and pair each with the profile's prediction."""
    here = device_name(device)
    if profile.device != here:
        raise ProfileError(f"profile {profile.path} is for device {profile.device!r} but this check runs on "
                           f"{here!r}; check it on that device, or profile this one with `pensieve profile`")
    if device.type == "cpu":
        tune_allocator()
    chunk = profile.chunk_tokens
    anchors = anchor_batches(profile)
    batches = check_batches(profile, 7 if args.quick else 21) + anchors
    repeats = 3 if args.quick else 5
    host_slots = 2 * max(b.swap_in + b.swap_out for b in batches) + 2
    slots_needed = max(sum(-(-c // chunk) for c in b.decodes) + sum(-(-c // chunk) for _, c in b.prefills)
                       + b.swap_out for b in batches)
    name = model_name_of(args, profile)
    dtype = args.dtype or profile.dtype
    loaded = load_for_profiling(name, device, dtype, lambda spec: (slots_needed + host_slots) * chunk_bytes(spec, chunk))
    check_profile_matches(profile, ModelSpec(**loaded.dims), f"--model {name or DEFAULT_MODEL}")
    bench = Bench(loaded, chunk, slots_needed, host_slots, seed=CHECK_SEED)
    steps = [lay_out(b, bench, host_slots) for b in batches]
    cost = ProfileCostModel(profile)
    interpolated = ProfileCostModel(profile, "interpolated") if cost.prefill_surface else None
    measured: list[list[float]] = [[] for _ in batches]
    probes = []
    order = random.Random(CHECK_SEED)
    with tqdm(total=(repeats + 1) * len(batches), desc="checking", unit="step") as bar:
        for p in range(repeats + 1):  # the first pass warms up
            probes.append(probe_bandwidth(device))
            for i in order.sample(range(len(steps)), len(steps)):
                seqs, swap_out, swap_in = steps[i]
                elapsed = bench.step(seqs, swap_out, swap_in)
                if p:
                    measured[i].append(elapsed)
                bar.update()
    then = profile.data.get("runtime", {}).get("bandwidth_probe_gb_s", {}).get("median")
    now = statistics.median(probes[1:])
    print(f"memory bandwidth probe: {now:.1f} GB/s now" + (f", {then:.1f} GB/s while profiling" if then else ""))
    return [CheckRow(b, statistics.median(m), cost.step_time_s(check_plan(i, b, so, si), chunk),
                     cost.step_time_s(check_plan(i, b, so, si, padded=True), chunk), b in anchors,
                     interpolated.step_time_s(check_plan(i, b, so, si), chunk) if interpolated else None)
            for i, (b, m, (_, so, si)) in enumerate(zip(batches, measured, steps))]


def print_check(rows: list[CheckRow], profile: Profile | None = None) -> None:
    """A table of measured against predicted step times, then median and p90 absolute error: as predicted,
    given the decodes' longest context, and with the machine's drift since profiling (from the grid-point
    steps) taken out; with a prefill table, the same for the interpolated surface and both surfaces'
    leave-one-out errors on the table's own points."""
    print(f"{'#':>2}  {'composition':<28} {'tokens':>6} {'decodes':>7} {'ctx max':>7} {'swap in/out':>11} "
          f"{'measured ms':>11} {'predicted ms':>12} {'error':>7} {'padded':>7}")
    for i, r in enumerate(rows):
        b = r.batch
        ctx = max([c for _, c in b.prefills] + b.decodes)
        print(f"{i:>2}  {b.label:<28} {b.tokens:>6} {len(b.decodes):>7} {ctx:>7} {f'{b.swap_in}/{b.swap_out}':>11} "
              f"{r.measured_s * 1e3:>11.1f} {r.predicted_s * 1e3:>12.1f} "
              f"{100 * (r.predicted_s / r.measured_s - 1):>+6.1f}% {100 * (r.padded_s / r.measured_s - 1):>+6.1f}%")
    checked = [r for r in rows if not r.anchor]
    anchors = [r.measured_s / r.predicted_s for r in rows if r.anchor]
    drift = float(np.median(anchors)) if anchors else 1.0

    def errors(predicted: list[float], measured: list[float]) -> str:
        e = np.abs(np.array(predicted) / np.array(measured) - 1)
        return f"median {100 * np.median(e):.1f}%, p90 {100 * np.percentile(e, 90):.1f}%"

    measured = [r.measured_s for r in checked]
    surfaces = [("", [r.predicted_s for r in checked])]
    if checked and checked[0].interpolated_s is not None:
        surfaces = [(" (fitted prefill surface)", surfaces[0][1]),
                    (" (interpolated prefill surface)", [r.interpolated_s for r in checked])]
    for name, predicted in surfaces:
        print(f"absolute error{name} over {len(checked)} steps: {errors(predicted, measured)}; "
              f"with the drift (x{drift:.3f}) taken out: {errors([p * drift for p in predicted], measured)}")
        long = [(p, r.measured_s) for p, r in zip(predicted, checked) if r.batch.label.startswith("long")]
        if long:
            print(f"  of which long prefills past the rows ({len(long)}): {errors(*zip(*long))}")
    print(f"absolute error given the decodes' longest context: "
          f"{errors([r.padded_s for r in checked], measured)}")
    if profile is not None and len(points := prefill_points(profile)):
        held_out = held_out_errors(points, ProfileCostModel(profile).decode_row, profile.chunk_tokens)
        print(f"prefill surface, each of the table's {len(points)} points predicted from the others "
              f"(edges by extrapolation): " + "; ".join(
                  f"{name} median {100 * np.median(np.abs(e)):.1f}%, p90 {100 * np.percentile(np.abs(e), 90):.1f}%, "
                  f"max {100 * np.max(np.abs(e)):.1f}%" for name, e in held_out.items()))
    print("targets on CPU: median <= 5%, p90 <= 10%; drift = measured / predicted at the grid points")
