"""Multi-token causal attention over paged, non-contiguous KV, plugged into transformers' attention registry.

A step packs every sequence's query tokens into one batch of size 1. Each layer's attention
writes the new K/V into the device pool at the tokens' absolute positions, then lets every
query token at position p of a sequence attend to that sequence's positions 0..p, gathered
from the pool through its block table. Query positions may have gaps (a recomputed leading
span plus a new prompt span); the positions in between must already be in the pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from executor.kv_store import PagedKVStore

if TYPE_CHECKING:
    from executor.runner import SeqInput

PAGED_ATTENTION = "pensieve_paged"
METADATA_KWARG = "paged_attention"


@dataclass
class _Span:
    """One sequence with several query tokens, attended in its own SDPA call."""

    q_start: int  # its query tokens are packed[q_start:q_end]
    q_end: int
    kv_slots: torch.Tensor  # [kv_len] device slot of each position 0..kv_len-1
    kv_offsets: torch.Tensor  # [kv_len] offset inside the slot
    mask: torch.Tensor | None  # [q_len, kv_len] bool, True = attend; None: a fresh prefill of positions 0..kv_len-1


@dataclass
class _Decodes:
    """All single-token queries, attended together in one padded SDPA call."""

    q_index: torch.Tensor  # [n] index of each decode token in the packed batch
    kv_slots: torch.Tensor  # [n, max_kv] (padding points at slot 0 and is masked)
    kv_offsets: torch.Tensor  # [n, max_kv]
    mask: torch.Tensor | None  # [n, 1, 1, max_kv] bool; None when all contexts have the same length


@dataclass
class PagedAttentionMetadata:
    """Per-step index tensors, built once and read by every layer's attention."""

    store: PagedKVStore
    write_slots: torch.Tensor  # [total_q] device slot where each query token's K/V goes
    write_offsets: torch.Tensor  # [total_q]
    spans: list[_Span]
    decodes: _Decodes | None
    max_kv_len: int

    @classmethod
    def build(cls, seqs: Sequence[SeqInput], store: PagedKVStore) -> PagedAttentionMetadata:
        """Index tensors for a packed batch of `seqs` (positions ascending, block tables covering them)."""
        chunk, device = store.chunk_tokens, store.device
        write_slots, write_offsets, spans, decodes = [], [], [], []
        q_start = max_kv_len = 0
        for seq in seqs:
            q_len = len(seq.positions)
            kv_len = seq.positions[-1] + 1 if q_len else 0
            covered = min(seq.context_len, len(seq.block_table) * chunk)
            in_range = all(0 <= slot < store.device_slots for slot in seq.block_table)
            if q_len == 0 or q_len != len(seq.token_ids) or kv_len > covered or not in_range:
                raise ValueError(
                    f"inconsistent sequence: {len(seq.token_ids)} tokens, {q_len} positions up to {kv_len - 1}, "
                    f"context_len {seq.context_len}, block table {seq.block_table} of {chunk}-token chunks "
                    f"over {store.device_slots} device slots"
                )
            table = torch.tensor(seq.block_table, dtype=torch.long)
            positions = torch.tensor(seq.positions, dtype=torch.long)  # [q_len]
            if positions[0] < 0 or not bool((positions[1:] > positions[:-1]).all()):
                raise ValueError(f"query positions must be ascending and non-negative: {seq.positions}")
            write_slots.append(table[positions // chunk])
            write_offsets.append(positions % chunk)
            if q_len == 1:
                decodes.append((q_start, table, kv_len))
            else:
                kv_pos = torch.arange(kv_len)
                mask = None if q_len == kv_len else kv_pos[None, :] <= positions[:, None]
                spans.append(_Span(
                    q_start, q_start + q_len,
                    table[kv_pos // chunk].to(device), (kv_pos % chunk).to(device),
                    None if mask is None else mask.to(device),
                ))
            q_start += q_len
            max_kv_len = max(max_kv_len, kv_len)
        return cls(
            store=store,
            write_slots=torch.cat(write_slots).to(device),
            write_offsets=torch.cat(write_offsets).to(device),
            spans=spans,
            decodes=_build_decodes(decodes, chunk, device) if decodes else None,
            max_kv_len=max_kv_len,
        )


def _build_decodes(decodes: list[tuple[int, torch.Tensor, int]], chunk: int, device: torch.device) -> _Decodes:
    """Pad the (query index, block table, context length) of single-token queries into one batch."""
    max_kv = max(kv_len for _, _, kv_len in decodes)
    max_chunks = (max_kv + chunk - 1) // chunk
    tables = torch.zeros(len(decodes), max_chunks, dtype=torch.long)  # [n, max_chunks], padded with slot 0
    for row, (_, table, kv_len) in enumerate(decodes):
        used = (kv_len + chunk - 1) // chunk
        tables[row, :used] = table[:used]
    kv_pos = torch.arange(max_kv)
    kv_lens = torch.tensor([kv_len for _, _, kv_len in decodes])
    same_len = bool((kv_lens == max_kv).all())
    return _Decodes(
        q_index=torch.tensor([q for q, _, _ in decodes], dtype=torch.long).to(device),
        kv_slots=tables[:, kv_pos // chunk].to(device),
        kv_offsets=(kv_pos % chunk).expand(len(decodes), -1).to(device),
        mask=None if same_len else (kv_pos[None, :] < kv_lens[:, None])[:, None, None, :].to(device),
    )


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
          scale: float) -> torch.Tensor:
    """SDPA with KV heads repeated for GQA (masked kernels on CUDA do not take `enable_gqa`)."""
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


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
    new_kv = torch.stack((key[0], value[0])).permute(2, 0, 1, 3)  # [total_q, 2, kv_heads, head_dim]
    pool[meta.write_slots, :, meta.write_offsets] = new_kv

    q = query[0]  # [heads, total_q, head_dim]
    out = q.new_empty(q.shape[1], q.shape[0], q.shape[2])  # [total_q, heads, head_dim]
    for span in meta.spans:
        if span.mask is None:  # the new K/V are exactly positions 0..q_len-1: skip the gather
            k, v = key[0, :, span.q_start : span.q_end], value[0, :, span.q_start : span.q_end]
        else:
            kv = pool[span.kv_slots, :, span.kv_offsets]  # [kv_len, 2, kv_heads, head_dim]
            k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)  # [kv_heads, kv_len, head_dim]
        o = _sdpa(q[:, span.q_start : span.q_end], k, v, span.mask, span.mask is None, scale)
        out[span.q_start : span.q_end] = o.transpose(0, 1)
    if meta.decodes is not None:
        d = meta.decodes
        kv = pool[d.kv_slots, :, d.kv_offsets]  # [n, max_kv, 2, kv_heads, head_dim]
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [n, kv_heads, max_kv, head_dim]
        qd = q[:, d.q_index].transpose(0, 1).unsqueeze(2)  # [n, heads, 1, head_dim]
        out[d.q_index] = _sdpa(qd, k, v, d.mask, False, scale)[:, :, 0]
    return out.unsqueeze(0), None


def register_paged_attention() -> None:
    """Add the paged attention to transformers' registry (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PAGED_ATTENTION, paged_attention_forward)
