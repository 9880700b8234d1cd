"""The grid of step shapes a profile is measured on: powers of two per table, chosen to fit the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from executor.profiling.memory import available_bytes
from pensieve.models import ModelSpec


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
        kv_budget = available_bytes(device) // 4 // spec.kv_bytes_per_token  # at most a quarter of free memory
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
