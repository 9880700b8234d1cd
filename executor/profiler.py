"""`pensieve profile`: measure a device's cost tables on the real runner, check a profile, or write a roofline.

Attention is timed from inside real forwards: the registered paged-attention function is wrapped and each
of its calls clocked, so what is measured is the executor's own kernel on its own data; the rest of the
same forward is the non-attention time. The method and the file format are in profiles/README.md.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import random
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from executor.attention import PAGED_ATTENTION, paged_attention_forward, register_paged_attention
from executor.cpu import ALLOCATOR, profiling_threads, torch_threads, tune_allocator
from executor.kv_store import PagedKVStore
from executor.models import RANDOM_PREFIX, LoadedModel, ModelLoadError, default_device, dtype_name, load_model
from executor.models import preset_dims, resolve_device, resolve_dtype
from executor.runner import ModelRunner, SeqInput, sample
from pensieve import analytical
from pensieve.models import DEFAULT_MODEL, PRESETS, ModelSpec, model_spec
from pensieve.plan import PrefillItem, StepPlan
from pensieve.profile import Profile, ProfileCostModel, ProfileError, check_profile_matches, dump_profile
from pensieve.profile import held_out_errors, load_profile, prefill_points

CHECK_SEED = 1234


def main(args: Any) -> int:
    """Entry point of `pensieve profile` (arguments as parsed by pensieve.cli)."""
    if args.analytical:
        return write_analytical(args)
    if getattr(args, "tensor_parallel", 1) != 1:
        raise ValueError("--tensor-parallel is for --analytical profiles: the profiler measures one device")
    device = resolve_device(args.device or default_device())
    with _threads(device):
        if args.check:
            profile = load_profile(args.check)
            print_check(run_check(profile, args, device), profile)
            return 0
        data = measure_profile(args, device)
    out = Path(args.out or f"profiles/{data['device']}-{_slug(data['model']['name'])}-{data['dtype']}.yaml")
    dump_profile(data, out)
    print(f"wrote {out} ({data['profile_seconds']:.0f} s)")
    return 0


@contextlib.contextmanager
def _threads(device: torch.device) -> Iterator[None]:
    """Measure with `profiling_threads()` on the CPU (executor/cpu.py says why)."""
    with torch_threads(profiling_threads() if device.type == "cpu" else None):
        yield


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.removeprefix(RANDOM_PREFIX).lower()).strip("-")


def _device_name(device: torch.device) -> str:
    """The profile's `device`: 'cpu', or the CUDA device's name as a slug (a profile is per device kind)."""
    return "cpu" if device.type == "cpu" else _slug(torch.cuda.get_device_name(device))


def _device_detail(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu} ({os.cpu_count()} logical CPUs), torch intra-op threads {torch.get_num_threads()}"


def _versions() -> dict[str, str]:
    import transformers

    try:
        pensieve = version("pensieve-sim")
    except PackageNotFoundError:
        pensieve = "unknown"
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "transformers": transformers.__version__, "numpy": np.__version__, "pensieve": pensieve}


# ----------------------------------------------------------------------------------------------------------
# What to load, and whether it fits


def _model_name(args: Any, profile: Profile | None = None) -> str | None:
    """The name for load_model: --random-weights turns a preset into random:<preset>; a check of a random
    model's profile defaults to that model."""
    if args.random_weights:
        return RANDOM_PREFIX + (args.model or "smollm2-135m").removeprefix(RANDOM_PREFIX)
    if args.model is None and profile is not None and profile.model.name.startswith(RANDOM_PREFIX):
        return profile.model.name
    return args.model


def _known_spec(name: str | None, dtype: str) -> ModelSpec | None:
    """Dimensions known without loading anything (built-in and random presets); None for other models."""
    if name is None:
        return PRESETS[DEFAULT_MODEL].with_dtype(dtype)
    if name.startswith(RANDOM_PREFIX):
        return ModelSpec(**preset_dims(name, dtype))
    return None


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_memory(spec: ModelSpec, device: torch.device, kv_bytes: int, weights: int | None = None) -> None:
    """Refuse, before allocating, a model and KV store that would not fit the device's free memory."""
    weights = analytical.param_count(spec) * spec.dtype_bytes if weights is None else weights
    slack = 512 * 2**20  # activations, allocator and library working space
    need, free = weights + kv_bytes + slack, _available_bytes(device)
    if need > 0.9 * free:
        raise ModelLoadError(
            f"{spec.name} in {spec.dtype} needs about {need / 1e9:.1f} GB on {device} (weights "
            f"{weights / 1e9:.1f} GB + KV store {kv_bytes / 1e9:.1f} GB + working space) but only "
            f"{free / 1e9:.1f} GB is free; use a smaller model, a 16-bit dtype, --quick or a larger device"
        )


def _load(name: str | None, device: torch.device, dtype: str, kv_bytes: Callable[[ModelSpec], int]) -> LoadedModel:
    """Load a model after checking that it and its KV store (`kv_bytes` of its dims) fit the device."""
    spec = _known_spec(name, dtype)
    if spec is not None:
        _check_memory(spec, device, kv_bytes(spec))
    loaded = load_model(name, str(device), dtype)
    if spec is None:  # only now are its dimensions known; the KV store is not allocated yet
        weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        spec = ModelSpec(**loaded.dims)
        _check_memory(spec, device, kv_bytes(spec), weights)
    return loaded


def _chunk_bytes(spec: ModelSpec, chunk: int) -> int:
    return chunk * spec.kv_bytes_per_token


# ----------------------------------------------------------------------------------------------------------
# The grid


def _powers(start: int, stop: int) -> list[int]:
    """start, 2*start, 4*start, ... <= stop."""
    out = []
    while start <= stop:
        out.append(start)
        start *= 2
    return out


@dataclass(frozen=True)
class Forward:
    """One measured forward: `decodes` single-token queries at KV length `kv_len`, or (decodes == 0) one
    sequence whose last `queries` tokens are new, ending at KV length `kv_len` (a fresh prefill when equal)."""

    queries: int
    kv_len: int
    decodes: int = 0


@dataclass(frozen=True)
class Grid:
    """The sample points, by device and mode; everything is a power of two (tables are interpolated)."""

    chunk: int
    kv_lens: tuple[int, ...]  # chunk, 2 chunk, ... up to the context cap
    queries: tuple[int, ...]  # prefill rows above the chunk row
    decodes: tuple[int, ...]  # decode batch sizes
    decode_tokens: int  # cap on decodes x KV length, to bound the KV store
    fresh: tuple[int, ...]  # batch sizes of the non-attention table (fresh prefills)
    repeats: int
    warmup: int = 1

    @classmethod
    def choose(cls, spec: ModelSpec, device: torch.device, chunk: int, quick: bool) -> Grid:
        cuda = device.type == "cuda"
        # CPU attention at 8K context takes seconds per forward; 4K keeps the full profile under 10 minutes.
        cap = 512 if quick else (16384 if cuda else 4096)
        kv_lens = _powers(chunk, min(spec.max_context, cap))
        if len(kv_lens) < 2:
            raise ValueError(f"chunk_tokens {chunk} leaves fewer than two context points under {kv_lens[-1:]} tokens")
        max_query = chunk * (4 if quick else 64 if cuda else 16)
        queries = [q for q in _powers(2 * chunk, max_query) if 2 * q <= kv_lens[-1]]  # >= 2 points per row
        decodes = (1, 4) if quick else tuple(_powers(1, 128 if cuda else 16))
        kv_budget = _available_bytes(device) // 4 // spec.kv_bytes_per_token  # at most a quarter of free memory
        decode_tokens = min(kv_budget, 4096 if quick else (262144 if cuda else 32768))
        largest = max(queries, default=chunk)
        # Fresh prefills serve the non-attention table and, past the prefill rows, the fresh-prefill diagonal:
        # whole-history prefills (`stateless`) run up to the largest context, so the full grid measures them
        # to half of it (on CPU, where 4K takes seconds) or 8K (a GPU, where non-attention flattens out later).
        fresh = _powers(1, largest if quick else max(largest, 8192 if cuda else kv_lens[-1] // 2))
        return cls(chunk, tuple(kv_lens), tuple(queries), decodes, decode_tokens, tuple(fresh), 3 if quick else 5)

    def forwards(self) -> list[Forward]:
        points = {Forward(self.chunk, kv) for kv in self.kv_lens}
        points |= {Forward(q, kv) for q in self.queries for kv in self.kv_lens if kv >= q}
        points |= {Forward(n, n) for n in self.fresh}
        points |= {Forward(1, kv, n) for n in self.decodes for kv in self.kv_lens if n * kv <= self.decode_tokens}
        return sorted(points, key=lambda f: (f.decodes, f.queries, f.kv_len))

    def device_slots(self) -> int:
        return max(max(f.decodes, 1) * -(-f.kv_len // self.chunk) for f in self.forwards())


# ----------------------------------------------------------------------------------------------------------
# Measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AttentionClock:
    """Wraps the registered paged attention so the time spent inside it during a forward can be read.

    CUDA calls are bracketed by events (no synchronisation inside the forward); CPU calls by perf_counter.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._calls: list[Any] = []

    def _timed(self, module: Any, *args: Any, **kwargs: Any) -> Any:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = paged_attention_forward(module, *args, **kwargs)
            end.record()
            self._calls.append((start, end))
            return out
        t0 = time.perf_counter()
        out = paged_attention_forward(module, *args, **kwargs)
        self._calls.append(time.perf_counter() - t0)
        return out

    @contextlib.contextmanager
    def installed(self) -> Iterator[AttentionClock]:
        from transformers import AttentionInterface

        AttentionInterface.register(PAGED_ATTENTION, self._timed)
        try:
            yield self
        finally:
            register_paged_attention()

    def take(self) -> float:
        """Seconds inside attention since the last take (call after the device is synchronised)."""
        calls, self._calls = self._calls, []
        if self.device.type == "cuda":
            return sum(start.elapsed_time(end) for start, end in calls) / 1e3
        return sum(calls)


class Bench:
    """The real runner over a paged store, with scattered block tables as a busy cache would have."""

    def __init__(self, loaded: LoadedModel, chunk: int, device_slots: int, host_slots: int, seed: int = 0) -> None:
        self.store = PagedKVStore.for_model(loaded.dims, device_slots, host_slots, chunk, loaded.device)
        self.store.host.zero_()  # the store leaves it unfilled; garbage could hold NaNs or slow denormals
        self.runner = ModelRunner(loaded, self.store)
        self.device = loaded.device
        self.chunk = chunk
        self.vocab = loaded.dims["vocab_size"]
        self.rng = random.Random(seed)
        self.slots = list(range(device_slots))
        self.rng.shuffle(self.slots)

    def sequence(self, positions: list[int], context: int, table: list[int]) -> SeqInput:
        return SeqInput([self.rng.randrange(self.vocab) for _ in positions], positions, table, context)

    def seqs(self, f: Forward) -> list[SeqInput]:
        chunks = -(-f.kv_len // self.chunk)
        if f.decodes:
            return [self.sequence([f.kv_len - 1], f.kv_len, self.slots[i * chunks:(i + 1) * chunks])
                    for i in range(f.decodes)]
        return [self.sequence(list(range(f.kv_len - f.queries, f.kv_len)), f.kv_len, self.slots[:chunks])]

    def forward(self, seqs: list[SeqInput], clock: AttentionClock) -> tuple[float, float]:
        """(forward seconds, of which attention seconds)."""
        _sync(self.device)
        start = time.perf_counter()
        self.runner.forward(seqs)
        _sync(self.device)
        total = time.perf_counter() - start
        return total, clock.take()

    def step(self, seqs: list[SeqInput], swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> float:
        """Seconds of one serving step as the engine runs it: copies, forward, sampling."""
        _sync(self.device)
        start = time.perf_counter()
        self.store.swap_out(swap_out)
        self.store.swap_in(swap_in)
        sample(self.runner.forward(seqs)).tolist()  # reading the tokens back synchronises the device
        return time.perf_counter() - start


def probe_bandwidth(device: torch.device) -> float:
    """GB/s of copying 64 MiB on `device` (best of 3): how much memory bandwidth other processes leave us.

    Recorded beside a profile and a check, because memory-bound attention on a shared machine swings with it.
    """
    src = torch.ones(16 * 2**20, device=device)  # [16M] fp32 = 64 MiB
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)
        _sync(device)

    return 2 * src.nbytes / min(_time(copy, 3, warmup=1)) / 1e9


def _stats(samples: list[float]) -> dict[str, float]:
    def r(x: float) -> float:
        return float(f"{x:.4g}")

    p10, p50, p90 = np.percentile(samples, [10, 50, 90])
    return {"median": r(p50), "p10": r(p10), "p90": r(p90)}


def _measure_copies(bench: Bench, repeats: int) -> dict[str, dict]:
    """Per-chunk copy time each way, whole (all layers, as the store swaps) and one layer's share copied alone."""
    store, device = bench.store, bench.device
    count = min(16, store.host_slots // 2, store.device_slots // 2)
    # Every other slot, so the store cannot merge neighbours into one long copy: one copy per chunk.
    pairs = list(zip(bench.slots[:count], range(0, 2 * count, 2)))
    moves = {"device_to_host": (store.swap_out, pairs, lambda d, h: (store.host.slot(0, h), store.device_pool[0, d])),
             "host_to_device": (store.swap_in, [(h, d) for d, h in pairs],
                                lambda h, d: (store.device_pool[0, d], store.host.slot(0, h)))}
    out = {}
    for direction, (swap, work, ends) in moves.items():
        def whole() -> None:
            swap(work)
            store.synchronize()

        def one_layer() -> None:
            for s, d in work:
                dst, src = ends(s, d)
                dst.copy_(src, non_blocking=device.type == "cuda")
            _sync(device)

        chunk_s = [t / count for t in _time(whole, repeats * 3)]
        layer_s = [t / count for t in _time(one_layer, repeats * 3)]
        median = statistics.median(chunk_s)
        out[direction] = {"chunk_s": _stats(chunk_s), "layer_chunk_s": _stats(layer_s),
                          "bytes_per_chunk": store.bytes_per_chunk,
                          "bandwidth_gb_s": float(f"{store.bytes_per_chunk / median / 1e9:.4g}")}
    return out


def _time(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def measure_profile(args: Any, device: torch.device) -> dict:
    """Run the grid on the real runner and return the profile dict (not yet written)."""
    began = time.perf_counter()
    tuned = device.type == "cpu" and tune_allocator()
    name = _model_name(args)
    dtype = dtype_name(resolve_dtype(args.dtype, device))
    chunk = args.chunk_tokens

    def kv_bytes(spec: ModelSpec) -> int:
        grid = Grid.choose(spec, device, chunk, args.quick)
        return (grid.device_slots() + 32) * _chunk_bytes(spec, chunk)

    loaded = _load(name, device, dtype, kv_bytes)
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
    overhead = _time(lambda: sample(logits).tolist(), 50)
    copies = _measure_copies(bench, grid.repeats)
    data = _profile_dict(loaded, device, grid, attention, non_attention, copies, overhead, tuned)
    data["runtime"]["bandwidth_probe_gb_s"] = _stats(probes[grid.warmup:])
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
            decode_rows[f.decodes][f.kv_len] = _stats(samples)
        elif f.queries in grid.queries:
            prefill_rows[f.queries][f.kv_len] = _stats(samples)
    fresh_past_rows = {f.queries: _stats(s) for f, s in sorted(attention.items(), key=lambda i: i[0].queries)
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
        "device": _device_name(device),
        "device_type": device.type,
        "device_detail": _device_detail(device),
        "model": {"name": loaded.name, "dims": {k: v for k, v in spec.to_dict().items() if k != "name"}},
        "dtype": spec.dtype,
        "chunk_tokens": chunk,
        "overlap_copies": device.type == "cuda",  # a CUDA copy stream runs beside compute; a CPU copy blocks
        "versions": _versions(),
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
            "chunk_attention_s": {f.kv_len: _stats(s) for f, s in sorted(attention.items(), key=lambda i: i[0].kv_len)
                                  if not f.decodes and f.queries == chunk},
            **({"prefill_attention_s": {q: dict(sorted(row.items())) for q, row in sorted(prefill_rows.items())}}
               if prefill_rows else {}),
            **({"fresh_prefill_attention_s": fresh_past_rows} if prefill_rows and fresh_past_rows else {}),
            "decode_attention_s": {n: dict(sorted(row.items())) for n, row in sorted(decode_rows.items())},
            "non_attention_s": {n: _stats(s) for n, s in fresh.items()},
            # A difference of two timings: noise can push it below zero, which no cost can be.
            "per_sequence_s": {k: max(v, 0.0) for k, v in _stats(per_sequence).items()} if per_sequence else 0.0,
            "copy_s": copies,
            "step_overhead_s": _stats(overhead),
        },
    }


# ----------------------------------------------------------------------------------------------------------
# Checking a profile against off-grid mixed batches


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


def speed_anchors(profile: Profile) -> list[CheckBatch]:
    """The prefill grid points of `anchor_batches` and a single decode at a mid-grid context: the step kinds
    a serving run is made of, each a point whose prediction is (almost) a table value."""
    kv = sorted(profile.tables["decode_attention_s"][1])
    return anchor_batches(profile) + [CheckBatch(f"grid point 1 decode @ {kv[len(kv) // 2]}", [], [kv[len(kv) // 2]])]


def machine_speed(profile: Profile, loaded: LoadedModel, repeats: int = 5) -> dict:
    """How fast this machine runs now against the profile: measured over predicted time of grid-point steps.

    A shared or virtual machine changes speed from minute to minute (other tenants, clocks), so a
    comparison with a profile taken earlier mixes that drift with the cost model's own error. Measured
    just before and after a run, this separates them. It reads nothing of the run itself.
    """
    chunk = profile.chunk_tokens
    batches = speed_anchors(profile)
    slots = max(sum(-(-c // chunk) for c in b.decodes) + sum(-(-c // chunk) for _, c in b.prefills) for b in batches)
    bench = Bench(loaded, chunk, slots, 2, seed=CHECK_SEED)
    cost = ProfileCostModel(profile)
    ratios = {}
    for i, batch in enumerate(batches):
        seqs, _, _ = _lay_out(batch, bench, 2)
        bench.step(seqs, [], [])  # warm-up
        measured = statistics.median(bench.step(seqs, [], []) for _ in range(repeats))
        ratios[batch.label] = measured / cost.step_time_s(_plan(i, batch, [], []), chunk)
    return {"factor": float(statistics.median(ratios.values())), "points": ratios}


def _lay_out(batch: CheckBatch, bench: Bench, host_slots: int) -> tuple[list[SeqInput], list, list]:
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


def _plan(i: int, batch: CheckBatch, swap_out: list, swap_in: list, padded: bool = False) -> StepPlan:
    prefills = [PrefillItem(1000 + j, j, spans, ctx) for j, (spans, ctx) in enumerate(batch.prefills)]
    n = len(batch.decodes)
    context = n * max(batch.decodes, default=0) if padded else sum(batch.decodes)
    return StepPlan(i, list(range(n)), context, prefills, swap_out, swap_in)


def run_check(profile: Profile, args: Any, device: torch.device) -> list[CheckRow]:
    """Measure off-grid mixed steps on the real runner and pair each with the profile's prediction."""
    here = _device_name(device)
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
    name = _model_name(args, profile)
    dtype = args.dtype or profile.dtype
    loaded = _load(name, device, dtype, lambda spec: (slots_needed + host_slots) * _chunk_bytes(spec, chunk))
    check_profile_matches(profile, ModelSpec(**loaded.dims), f"--model {name or DEFAULT_MODEL}")
    bench = Bench(loaded, chunk, slots_needed, host_slots, seed=CHECK_SEED)
    steps = [_lay_out(b, bench, host_slots) for b in batches]
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
    return [CheckRow(b, statistics.median(m), cost.step_time_s(_plan(i, b, so, si), chunk),
                     cost.step_time_s(_plan(i, b, so, si, padded=True), chunk), b in anchors,
                     interpolated.step_time_s(_plan(i, b, so, si), chunk) if interpolated else None)
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


# ----------------------------------------------------------------------------------------------------------
# Roofline profiles


def measure_cpu_roofline() -> analytical.Roofline:
    """This CPU as a roofline: best fp32 GEMM rate and copy bandwidth on one thread, and the fixed cost of a
    tiny module call (the CPU's "kernel launch": Python and operator dispatch)."""
    with _threads(torch.device("cpu")):
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)  # [1024, 1024] each: 2 GFLOP per product
        flops = 2 * 1024**3 / min(_time(lambda: a @ b, 10))
        src = torch.ones(64 * 2**20)  # 256 MiB, far beyond the last-level cache
        dst = torch.empty_like(src)
        bandwidth = 2 * src.nbytes / min(_time(lambda: dst.copy_(src), 5))  # read + write
        layer, x = torch.nn.Linear(8, 8), torch.randn(1, 8)
        with torch.inference_mode():
            launch = statistics.median(_time(lambda: layer(x), 2000, warmup=100))
        description = _device_detail(torch.device("cpu"))
    return analytical.Roofline(
        name="cpu",
        description=description,
        peak_flops={"float32": flops},
        memory_bandwidth=bandwidth,
        link_bandwidth=bandwidth,  # both tiers are RAM: a swap is a memory copy
        compute_efficiency=1.0,  # the figures are measured, already what a kernel sustains
        memory_efficiency=1.0,
        launch_s=launch,
        overlap_copies=False,
        sources=(f"measured by `pensieve profile --analytical cpu` on {datetime.date.today().isoformat()}: best of "
                 "10 fp32 1024x1024 matmuls (torch, 1 thread); best of 5 copies of 256 MiB (bytes read + written); "
                 "median call of nn.Linear(8, 8) on one row as the per-kernel dispatch cost",),
    )


def write_analytical(args: Any) -> int:
    """`--analytical GPU`: a roofline profile of a model preset on a published GPU (or this CPU, measured)."""
    gpu = args.analytical.lower()
    gpus = getattr(args, "tensor_parallel", 1)
    if gpus != 1 and gpu not in analytical.GPUS:
        raise ValueError(f"--tensor-parallel {gpus}: only the published GPUs have an interconnect to split a model "
                         f"over ({', '.join(analytical.GPUS)})")
    name = (args.model or DEFAULT_MODEL).removeprefix(RANDOM_PREFIX).lower()
    if name not in PRESETS:
        raise ValueError(f"--analytical needs a model preset for its dimensions; known: {', '.join(PRESETS)}")
    if gpu == "cpu":
        spec = model_spec(name, args.dtype or "float32")
        roof = measure_cpu_roofline()
        data = analytical.analytical_profile(spec, roof, args.chunk_tokens, max_context=min(spec.max_context, 4096),
                                             max_batch_tokens=1024, max_decodes=16)
    elif gpu in analytical.GPUS:
        spec = model_spec(name, args.dtype or "float16")
        data = analytical.analytical_profile(spec, analytical.GPUS[gpu], args.chunk_tokens, tensor_parallel=gpus)
    else:
        raise ValueError(f"--analytical {args.analytical!r}: known devices are "
                         f"{', '.join([*analytical.GPUS, 'cpu'])}")
    suffix = "-analytical" if gpu == "cpu" else ""  # beside a measured profile of the same device
    gpus_prefix = f"{gpus}x" if gpus > 1 else ""
    out = Path(args.out or f"profiles/{gpus_prefix}{gpu}-{_slug(spec.name)}-{spec.dtype}{suffix}.yaml")
    dump_profile(data, out)
    print(f"wrote {out}")
    return 0
