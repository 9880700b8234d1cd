"""A measured profile from the grid's timings: the tables, the method and the metadata written to profiles/."""

from __future__ import annotations

import datetime
import random
import statistics
import time
from collections import defaultdict
from typing import Any

import torch
from tqdm import tqdm

from executor.cpu import ALLOCATOR, tune_allocator
from executor.models import LoadedModel, dtype_name, resolve_dtype
from executor.profiling.device import device_detail, device_name, versions
from executor.profiling.grid import Forward, Grid
from executor.profiling.harness import AttentionClock, Bench, measure_copies, stats, time_calls, probe_bandwidth
from executor.profiling.memory import chunk_bytes, load_for_profiling, model_name_of
from executor.runner import sample
from pensieve.models import ModelSpec


def measure_profile(args: Any, device: torch.device) -> dict:
    """Run the grid on the real runner and return the profile dict (not yet written)."""
    began = time.perf_counter()
    tuned = device.type == "cpu" and tune_allocator()
    name = model_name_of(args)
    dtype = dtype_name(resolve_dtype(args.dtype, device))
    chunk = args.chunk_tokens

    def kv_bytes(spec: ModelSpec) -> int:
        grid = Grid.choose(spec, device, chunk, args.quick)
        return (grid.device_slots() + 32) * chunk_bytes(spec, chunk)

    loaded = load_for_profiling(name, device, dtype, kv_bytes)
    spec = ModelSpec(**loaded.dims)
    grid = Grid.choose(spec, device, chunk, args.quick)
    bench = Bench(loaded, chunk, grid.device_slots(), 32)
    forwards = grid.forwards()
    clock = AttentionClock(device)
    totals: dict[Forward, list[float]] = defaultdict(list)
    attention: dict[Forward, list[float]] = defaultdict(list)
    passes = grid.warmup + grid.repeats
    probes = []
    with clock.installed(), tqdm(total=passes * len(forwards), desc=f"profiling {loaded.name}", unit="fwd") as bar:
        # Whole passes over the grid, so a burst of load elsewhere spreads over points instead of ruining one;
        # shuffled, so each point follows different forwards (as in serving) rather than its grid neighbour.
        order = random.Random(0)
        for p in range(passes):
            probes.append(probe_bandwidth(device))
            for f in order.sample(forwards, len(forwards)):
                total, attn = bench.forward(bench.seqs(f), clock)
                if p >= grid.warmup:
                    totals[f].append(total)
                    attention[f].append(attn)
                bar.update()
    non_attention = {f: [t - a for t, a in zip(totals[f], attention[f])] for f in forwards}
    logits = torch.randn(1, bench.vocab, device=device)
    overhead = time_calls(lambda: sample(logits).tolist(), 50)
    copies = measure_copies(bench, grid.repeats)
    data = _profile_dict(loaded, device, grid, attention, non_attention, copies, overhead, tuned)
    data["runtime"]["bandwidth_probe_gb_s"] = stats(probes[grid.warmup:])
    data["profile_seconds"] = round(time.perf_counter() - began, 1)
    return data


def _profile_dict(loaded: LoadedModel, device: torch.device, grid: Grid, attention: dict, non_attention: dict,
                  copies: dict, overhead: list[float], tuned: bool) -> dict:
    spec = ModelSpec(**loaded.dims)
    chunk = grid.chunk
    decode_rows: dict[int, dict] = defaultdict(dict)
    prefill_rows: dict[int, dict] = defaultdict(dict)
    for f, samples in attention.items():
        if f.decodes:
            decode_rows[f.decodes][f.kv_len] = stats(samples)
        elif f.queries in grid.queries:
            prefill_rows[f.queries][f.kv_len] = stats(samples)
    fresh_past_rows = {f.queries: stats(s) for f, s in sorted(attention.items(), key=lambda i: i[0].queries)
                       if not f.decodes and f.queries == f.kv_len and f.queries > max(grid.queries, default=chunk)}
    fresh = {n: non_attention[Forward(n, n)] for n in grid.fresh}
    fresh_median = {n: statistics.median(s) for n, s in fresh.items()}
    # Each extra sequence adds a logits row and per-sequence metadata: n decodes against one n-token sequence,
    # at the shortest context (at longer ones the decode attention also slows the rest of the forward).
    per_sequence = [(s - fresh_median[f.decodes]) / (f.decodes - 1) for f, samples in non_attention.items()
                    if f.decodes > 1 and f.kv_len == grid.kv_lens[0] for s in samples]
    return {
        "format": 1,
        "source": "measured",
        "device": device_name(device),
        "device_type": device.type,
        "device_detail": device_detail(device),
        "model": {"name": loaded.name, "dims": {k: v for k, v in spec.to_dict().items() if k != "name"}},
        "dtype": spec.dtype,
        "chunk_tokens": chunk,
        "overlap_copies": device.type == "cuda",  # a CUDA copy stream runs beside compute; a CPU copy blocks
        "versions": versions(),
        "date": datetime.date.today().isoformat(),
        "runtime": {"torch_threads": torch.get_num_threads()} | ({"allocator": ALLOCATOR} if tuned else {}),
        "method": (
            f"real ModelRunner forwards over a PagedKVStore (scattered block tables), {grid.warmup} warm-up "
            f"pass and {grid.repeats} measured passes over the whole grid, each in a new random order; "
            "attention = time inside the registered paged-attention function (all layers, KV write "
            "included); non-attention = the rest of a fresh prefill's forward; copies = "
            "PagedKVStore.swap_out/swap_in of 16 scattered chunks; step overhead = sampling and reading the "
            "tokens back."
        ),
        "repeats": grid.repeats,
        "tables": {
            "chunk_attention_s": {f.kv_len: stats(s) for f, s in sorted(attention.items(), key=lambda i: i[0].kv_len)
                                  if not f.decodes and f.queries == chunk},
            **({"prefill_attention_s": {q: dict(sorted(row.items())) for q, row in sorted(prefill_rows.items())}}
               if prefill_rows else {}),
            **({"fresh_prefill_attention_s": fresh_past_rows} if prefill_rows and fresh_past_rows else {}),
            "decode_attention_s": {n: dict(sorted(row.items())) for n, row in sorted(decode_rows.items())},
            "non_attention_s": {n: stats(s) for n, s in fresh.items()},
            # A difference of two timings: noise can push it below zero, which no cost can be.
            "per_sequence_s": {k: max(v, 0.0) for k, v in stats(per_sequence).items()} if per_sequence else 0.0,
            "copy_s": copies,
            "step_overhead_s": stats(overhead),
        },
    }
