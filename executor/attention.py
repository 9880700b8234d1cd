"""Multi-token causal attention over paged, non-contiguous KV, plugged into transformers' attention registry.

A step packs every sequence's query tokens into one batch of size 1. Each layer's attention
writes the new K/V into the device pool at the tokens' absolute positions, then lets every
query token at position p of a sequence attend to that sequence's positions 0..p, gathered
from the pool through its block table. Query positions may have gaps (a recomputed leading
span plus a new prompt span); the positions in between must already be in the pool.

Cost notes (CPU, where this runs the benchmark): decodes on the CPU in fp32 read their chunks
straight from the pool in a C kernel (executor/native.py); elsewhere they, and multi-token spans
everywhere, gather whole chunks with `index_select` (one contiguous block per chunk, K and V
apart) rather than token by token. Decodes go in groups of similar context length, each group's
padded gather at most DECODE_GATHER_BYTES per layer (`decode_groups`). Multi-token spans of similar size share one padded SDPA call
per layer (runs of equal fresh prefills need no padding, mask or gather at all). Grouped-query
attention never repeats K/V on the CPU: SDPA's `enable_gqa` for spans, head groups folded into
the query length for decodes. Masks are built once per step, additive in the query dtype, on the
device from each row's position or length (nothing of a step's masks is uploaded from the host).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from executor import native
from executor.kv_store import PagedKVStore

if TYPE_CHECKING:
    from executor.runner import SeqInput

PAGED_ATTENTION = "pensieve_paged"
METADATA_KWARG = "paged_attention"


@dataclass
class _SpanGroup:
    """Sequences with several query tokens, attended together in one padded SDPA call.

    Padded to `count` x `q_len` query rows over `kv_len` keys; a padded row attends to key 0 only.
    """

    count: int
    q_len: int
    kv_len: int
    start: int  # dense groups: the rows are packed[start : start + count * q_len], in order, unpadded
    rows: torch.Tensor | None  # [count * q_len] packed index of each padded row; None: dense
    valid: torch.Tensor | None  # [real rows] which padded rows are real; None: dense
    targets: torch.Tensor | None  # [real rows] their packed index; None: dense
    chunks: torch.Tensor | None  # [count * max_chunks] device slots (padded with 0); None: fresh prefills
    mask: torch.Tensor | None  # [count, 1, q_len, kv_len] additive (0 / -inf); None: causal over the new K/V


@dataclass
class _Decodes:
    """All single-token queries, attended together: by the C kernel, or in one padded SDPA call."""

    q_index: torch.Tensor | slice  # [n] index of each decode token in the packed batch (a slice when contiguous)
    n: int
    chunks: torch.Tensor  # [n, max_chunks] device slot of every chunk (padding points at slot 0)
    kv_lens: torch.Tensor  # [n] int64
    max_kv: int
    mask: torch.Tensor | None  # [n, 1, 1, max_kv] additive (0 / -inf); None when all contexts have the same length


@dataclass
class PagedAttentionMetadata:
    """Per-step index tensors, built once and read by every layer's attention."""

    store: PagedKVStore
    write_slots: torch.Tensor  # [total_q] device slot where each query token's K/V goes
    write_offsets: torch.Tensor  # [total_q]
    groups: list[_SpanGroup]
    decodes: list[_Decodes]  # in groups of similar context length (see `decode_groups`)
    max_kv_len: int

    @classmethod
    def build(cls, seqs: Sequence[SeqInput], store: PagedKVStore,
              dtype: torch.dtype | None = None) -> PagedAttentionMetadata:
        """Index tensors for a packed batch of `seqs` (positions ascending, block tables covering them).

        `dtype`: the query dtype, for the additive masks (default: the store's).
        """
        chunk, device = store.chunk_tokens, store.device
        dtype = store.dtype if dtype is None else dtype
        write_slots: list[int] = []
        write_offsets: list[int] = []
        spans: list[_SpanInput] = []
        decodes: list[tuple[int, list[int], int]] = []
        q_start = max_kv_len = 0
        for seq in seqs:
            positions, table = seq.positions, seq.block_table
            q_len = len(positions)
            kv_len = positions[-1] + 1 if q_len else 0
            covered = min(seq.context_len, len(table) * chunk)
            in_range = all(0 <= slot < store.device_slots for slot in table)
            if q_len == 0 or q_len != len(seq.token_ids) or kv_len > covered or not in_range:
                raise ValueError(
                    f"inconsistent sequence: {len(seq.token_ids)} tokens, {q_len} positions up to {kv_len - 1}, "
                    f"context_len {seq.context_len}, block table {seq.block_table} of {chunk}-token chunks "
                    f"over {store.device_slots} device slots"
                )
            if positions[0] < 0 or any(b <= a for a, b in zip(positions, positions[1:])):
                raise ValueError(f"query positions must be ascending and non-negative: {seq.positions}")
            write_slots.extend(table[p // chunk] for p in positions)
            write_offsets.extend(p % chunk for p in positions)
            used = table[: -(-kv_len // chunk)]
            if q_len == 1:
                decodes.append((q_start, used, kv_len))
            else:
                spans.append(_SpanInput(q_start, positions, used, kv_len))
            q_start += q_len
            max_kv_len = max(max_kv_len, kv_len)
        return cls(
            store=store,
            write_slots=torch.tensor(write_slots, dtype=torch.long, device=device),
            write_offsets=torch.tensor(write_offsets, dtype=torch.long, device=device),
            groups=[_build_group(g, chunk, device, dtype) for g in _group_spans(spans)],
            decodes=[_build_decodes(g, chunk, device, dtype)
                     for g in decode_groups(decodes, chunk, store.decode_bytes_per_token)],
            max_kv_len=max_kv_len,
        )


@dataclass
class _SpanInput:
    q_start: int
    positions: list[int]
    table: list[int]  # the chunks covering 0..kv_len-1
    kv_len: int

    @property
    def fresh(self) -> bool:
        """Positions 0..kv_len-1: its new K/V are all it attends to."""
        return len(self.positions) == self.kv_len


# Spans share one padded SDPA call while the padded work stays within this factor of the real work.
MAX_PADDING = 1.25


def _group_spans(spans: list[_SpanInput]) -> list[list[_SpanInput]]:
    """Spans in batches: runs of equal fresh prefills packed back to back, then the rest by size."""
    groups: list[list[_SpanInput]] = []
    rest: list[_SpanInput] = []
    for span in spans:
        last = groups[-1][-1] if groups else None
        if (span.fresh and last is not None and last.kv_len == span.kv_len
                and last.q_start + last.kv_len == span.q_start):
            groups[-1].append(span)
        elif span.fresh:
            groups.append([span])
        else:
            rest.append(span)
    singles = [g[0] for g in groups if len(g) == 1]  # a lone fresh span may pad with the others
    groups = [g for g in groups if len(g) > 1]
    rest = sorted(rest + singles, key=lambda s: (s.kv_len, len(s.positions)), reverse=True)
    current: list[_SpanInput] = []
    for span in rest:
        candidate = current + [span]
        q_max = max(len(s.positions) for s in candidate)
        kv_max = max(s.kv_len for s in candidate)
        real = sum(len(s.positions) * s.kv_len for s in candidate)
        if current and len(candidate) * q_max * kv_max > MAX_PADDING * real:
            groups.append(current)
            candidate = [span]
        current = candidate
    if current:
        groups.append(current)
    return groups


def _build_group(spans: list[_SpanInput], chunk: int, device: torch.device, dtype: torch.dtype) -> _SpanGroup:
    count = len(spans)
    q_len = max(len(s.positions) for s in spans)
    kv_len = max(s.kv_len for s in spans)
    first = spans[0].q_start
    dense = all(len(s.positions) == q_len and s.q_start == first + i * q_len for i, s in enumerate(spans))
    if dense and all(s.fresh for s in spans):
        return _SpanGroup(count, q_len, kv_len, first, None, None, None, None, None)
    max_chunks = -(-kv_len // chunk)
    chunks: list[int] = []
    rows: list[int] = []
    valid: list[int] = []
    # Each row's query position; a padded row gets -1 and attends to key 0 only, so that its softmax
    # stays finite. The mask is then built on the device from these few numbers, not uploaded.
    positions: list[int] = []
    for i, span in enumerate(spans):
        chunks.extend(span.table)
        chunks.extend([0] * (max_chunks - len(span.table)))  # finite (the pool is zero-filled) and masked out
        n = len(span.positions)
        rows.extend(range(span.q_start, span.q_start + n))
        rows.extend([span.q_start] * (q_len - n))
        valid.extend(range(i * q_len, i * q_len + n))
        positions.extend(span.positions)
        positions.extend([-1] * (q_len - n))
    targets = [r for s in spans for r in range(s.q_start, s.q_start + len(s.positions))]
    tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
    pos = tensor(positions).view(count, 1, q_len, 1)
    keys = torch.arange(kv_len, device=device)
    allowed = (keys <= pos) | ((pos < 0) & (keys == 0))  # [count, 1, q_len, kv_len]
    return _SpanGroup(
        count, q_len, kv_len, first,
        None if dense else tensor(rows), None if dense else tensor(valid), None if dense else tensor(targets),
        tensor(chunks), _additive(allowed, dtype, device),
    )


def _additive(allowed: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A boolean mask (True = attend) as the additive float mask SDPA would convert it to, built where
    `allowed` is (the device: a step's masks are never uploaded from the host)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, float("-inf")).to(device)


# The K and V that one decode group's padded gather may copy per layer, where a decode is not served in
# place by the C kernel (CUDA, half precision). Padding every decode to the longest context once took
# 43 GB per layer for OPT-13B with 128 decodes, one of them at 16K tokens.
DECODE_GATHER_BYTES = 256 << 20


def decode_groups(decodes: list[tuple[int, list[int], int]], chunk: int, bytes_per_token: int,
                  budget: int | None = None) -> list[list[tuple[int, list[int], int]]]:
    """Decodes (query index, block table, context length) in groups attended together: longest first,
    a group closed when padding would exceed MAX_PADDING x its real work or its padded K and V would
    exceed `budget` bytes. The temporaries of a decode step's attention are thus at most `budget` per
    layer, or one decode's own context where that alone is larger (default budget: DECODE_GATHER_BYTES)."""
    budget = DECODE_GATHER_BYTES if budget is None else budget
    groups: list[list[tuple[int, list[int], int]]] = []
    current: list[tuple[int, list[int], int]] = []
    real = 0
    for item in sorted(decodes, key=lambda d: d[2], reverse=True):
        longest = current[0][2] if current else item[2]
        count = len(current) + 1
        gathered = count * -(-longest // chunk) * chunk  # whole chunks are gathered
        if current and (count * longest > MAX_PADDING * (real + item[2]) or gathered * bytes_per_token > budget):
            groups.append(current)
            current, real = [], 0
        current.append(item)
        real += item[2]
    if current:
        groups.append(current)
    return groups


def _build_decodes(decodes: list[tuple[int, list[int], int]], chunk: int, device: torch.device,
                   dtype: torch.dtype) -> _Decodes:
    """Pad the (query index, used block table, context length) of single-token queries into one batch."""
    max_kv = max(kv_len for _, _, kv_len in decodes)
    max_chunks = -(-max_kv // chunk)
    chunks: list[int] = []
    for _, table, _ in decodes:  # padded with slot 0: finite (the pool is zero-filled), and masked out
        chunks.extend(table)
        chunks.extend([0] * (max_chunks - len(table)))
    q_index = [q for q, _, _ in decodes]
    lengths = [kv_len for _, _, kv_len in decodes]
    kv_lens = torch.tensor(lengths, device=device)
    n = len(decodes)
    contiguous = q_index == list(range(q_index[0], q_index[0] + n))
    return _Decodes(
        q_index=slice(q_index[0], q_index[0] + n) if contiguous else torch.tensor(q_index, device=device),
        n=n,
        chunks=torch.tensor(chunks, dtype=torch.long, device=device).view(n, max_chunks),
        kv_lens=kv_lens,
        max_kv=max_kv,
        mask=None if min(lengths) == max_kv else  # built on the device from the lengths
        _additive(torch.arange(max_kv, device=device)[None, :] < kv_lens[:, None], dtype, device)[:, None, None, :],
    )


def _gather(pool: torch.Tensor, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the chunk slots `chunks`, each [len(chunks) * chunk_tokens, kv_heads, head_dim]."""
    flat = (-1, *pool.shape[-2:])
    return pool[:, 0].index_select(0, chunks).view(flat), pool[:, 1].index_select(0, chunks).view(flat)


def _native_decode(pool: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether the C decode kernel serves this layer: fp32 on the CPU, a head size it handles, and built."""
    return (pool.device.type == "cpu" and pool.dtype == q.dtype == torch.float32 and pool.is_contiguous()
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256 and native.decode_kernel() is not None)


# SDPA takes `enable_gqa` from torch 2.5 on.
_SDPA_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
          scale: float) -> torch.Tensor:
    """SDPA with grouped KV heads: CPU kernels take `enable_gqa`; masked CUDA kernels do not, so repeat there.
    On CUDA only the fused kernels may serve it (`fused_only`)."""
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1 and q.device.type == "cpu" and _SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    with fused_only(q.device):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


# SDPA falls back to its math kernel, silently, when no fused kernel takes a call (a dtype, a head size,
# a mask layout): the math kernel materializes every [query, key] score matrix, 16K x 16K x heads
# per sequence. On CUDA, SDPA is allowed only these; a call none of them takes is an error.
FUSED_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def fused_only(device: torch.device):
    """On CUDA, a context in which SDPA may use only the fused kernels; elsewhere nothing."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in FUSED_BACKENDS if hasattr(SDPBackend, name)])


def first_backend(candidates: Sequence[str], attempt) -> str:
    """The first of `candidates` for which `attempt(name)` runs; ValueError naming them all when none does."""
    reasons = []
    for name in candidates:
        try:
            attempt(name)
        except RuntimeError as exc:
            reasons.append(f"{name}: {str(exc).splitlines()[0][:120]}")
            continue
        return name
    raise ValueError("no fused attention kernel takes this model's masked attention (" + "; ".join(reasons) +
                     "); SDPA would fall back to its math kernel, which materializes every query-by-key score "
                     "matrix: serve another dtype (--dtype) or install a torch whose kernels support it")


def check_backend(dtype: torch.dtype, heads: int, head_dim: int, device: torch.device) -> str:
    """Which fused kernel serves a masked SDPA call of this model's shape on `device` (checked on the first
    CUDA step, reported, and kept); "cpu" on the CPU, where a step's attention is checked by the tests."""
    if device.type != "cuda":
        return "cpu"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, heads, 8, head_dim, dtype=dtype, device=device)
    mask = torch.zeros(2, 1, 8, 40, dtype=dtype, device=device)
    kv = torch.randn(2, heads, 40, head_dim, dtype=dtype, device=device)

    def attempt(name: str) -> None:
        with sdpa_kernel([getattr(SDPBackend, name)]):
            F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask)

    return first_backend([n for n in FUSED_BACKENDS if hasattr(SDPBackend, n)], attempt)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, total_q, head_dim]
    key: torch.Tensor,  # [1, kv_heads, total_q, head_dim]
    value: torch.Tensor,  # [1, kv_heads, total_q, head_dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention function; returns [1, total_q, heads, head_dim] and no weights.

    Ignores `attention_mask` (transformers builds none for an unregistered mask type) and takes
    the query tokens' layout from the metadata in `kwargs[METADATA_KWARG]`.
    """
    meta: PagedAttentionMetadata = kwargs[METADATA_KWARG]
    if sliding_window is not None and meta.max_kv_len > sliding_window:
        raise NotImplementedError(f"sliding-window attention (window {sliding_window}) is not supported")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling  # OPT pre-scales its query and passes 1.0
    meta.store.wait_layer(module.layer_idx)
    pool = meta.store.device_pool[module.layer_idx]  # [slots, 2, chunk_tokens, kv_heads, head_dim]
    k_new, v_new = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [total_q, kv_heads, head_dim]
    pool[meta.write_slots, 0, meta.write_offsets] = k_new
    pool[meta.write_slots, 1, meta.write_offsets] = v_new

    q = query[0]  # [heads, total_q, head_dim]
    heads, total_q, head_dim = q.shape
    kv_heads = key.shape[1]
    out = q.new_empty(total_q, heads, head_dim)
    for g in meta.groups:
        rows = g.count * g.q_len
        if g.rows is None:  # [heads, rows, head_dim] -> [count, heads, q_len, head_dim]
            qg = q[:, g.start : g.start + rows]
        else:
            qg = q.index_select(1, g.rows)
        qg = qg.unflatten(1, (g.count, g.q_len)).transpose(0, 1)
        if g.chunks is None:  # fresh prefills: the new K/V are exactly positions 0..q_len-1, no gather
            k = key[0, :, g.start : g.start + rows].unflatten(1, (g.count, g.q_len)).transpose(0, 1)
            v = value[0, :, g.start : g.start + rows].unflatten(1, (g.count, g.q_len)).transpose(0, 1)
            o = _sdpa(qg, k, v, None, True, scale)
        else:
            k, v = _gather(pool, g.chunks)  # [count * max_chunks * chunk_tokens, kv_heads, head_dim]
            k = k.view(g.count, -1, kv_heads, head_dim)[:, : g.kv_len].transpose(1, 2)
            v = v.view(g.count, -1, kv_heads, head_dim)[:, : g.kv_len].transpose(1, 2)
            o = _sdpa(qg, k, v, g.mask, False, scale)
        o = o.transpose(1, 2).reshape(rows, heads, head_dim)  # [count * q_len, heads, head_dim]
        if g.valid is None:
            out[g.start : g.start + rows] = o
        else:
            out[g.targets] = o.index_select(0, g.valid)
    for d in meta.decodes:
        qd = q[:, d.q_index].transpose(0, 1)  # [n, heads, head_dim]
        if _native_decode(pool, qd):
            out[d.q_index] = native.paged_decode(pool, d.chunks, d.kv_lens, qd.contiguous(), scale)
        else:
            k, v = _gather(pool, d.chunks.view(-1))
            shape = (d.n, -1, kv_heads, head_dim)  # -> [n, kv_heads, max_kv, head_dim], views of the gather
            k = k.view(shape)[:, : d.max_kv].transpose(1, 2)
            v = v.view(shape)[:, : d.max_kv].transpose(1, 2)
            # A decode's head groups share their KV head: fold them into the query length, [n, kv_heads, groups, dim].
            qd = qd.reshape(d.n, kv_heads, heads // kv_heads, head_dim)
            with fused_only(qd.device):
                o = F.scaled_dot_product_attention(qd, k, v, attn_mask=d.mask, scale=scale)
            out[d.q_index] = o.reshape(d.n, heads, head_dim)
    return out.unsqueeze(0), None


def register_paged_attention() -> None:
    """Add the paged attention to transformers' registry (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PAGED_ATTENTION, paged_attention_forward)
