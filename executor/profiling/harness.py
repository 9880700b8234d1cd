"""The timing harness: the real runner over a scattered paged store, attention clocked from inside the forward, copies timed each way."""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from executor.attention import PAGED_ATTENTION, paged_attention_forward, register_paged_attention
from executor.kv_store import PagedKVStore
from executor.models import LoadedModel
from executor.profiling.grid import Forward
from executor.runner import ModelRunner, SeqInput, sample


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

    return 2 * src.nbytes / min(time_calls(copy, 3, warmup=1)) / 1e9


def stats(samples: list[float]) -> dict[str, float]:
    def r(x: float) -> float:
        return float(f"{x:.4g}")

    p10, p50, p90 = np.percentile(samples, [10, 50, 90])
    return {"median": r(p50), "p10": r(p10), "p90": r(p90)}


def measure_copies(bench: Bench, repeats: int) -> dict[str, dict]:
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

        chunk_s = [t / count for t in time_calls(whole, repeats * 3)]
        layer_s = [t / count for t in time_calls(one_layer, repeats * 3)]
        median = statistics.median(chunk_s)
        out[direction] = {"chunk_s": stats(chunk_s), "layer_chunk_s": stats(layer_s),
                          "bytes_per_chunk": store.bytes_per_chunk,
                          "bandwidth_gb_s": float(f"{store.bytes_per_chunk / median / 1e9:.4g}")}
    return out


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples
