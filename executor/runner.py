"""One forward pass per serving step over a packed batch of sequences whose KV lives in a PagedKVStore."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from executor.attention import (METADATA_KWARG, PAGED_ATTENTION, PagedAttentionMetadata, check_backend,
                                register_paged_attention)
from executor.kv_store import PagedKVStore
from executor.models import LoadedModel
from executor.native import packed_linears

log = logging.getLogger("pensieve.executor")


@dataclass
class SeqInput:
    """One sequence's part of a step.

    `token_ids`/`positions`: this step's query tokens, positions ascending, possibly with gaps whose
    KV is already in the pool. `block_table[i]`: device slot of chunk i, covering [0, context_len).
    """

    token_ids: list[int]
    positions: list[int]
    block_table: list[int]
    context_len: int


class ModelRunner:
    """Runs the model's own modules with the attention replaced by paged attention over `store`."""

    def __init__(self, loaded: LoadedModel, store: PagedKVStore) -> None:
        dims = loaded.dims
        expected = (dims["layers"], dims["kv_heads"], dims["head_dim"], loaded.torch_dtype, loaded.device)
        actual = (store.layers, store.kv_heads, store.head_dim, store.dtype, store.device)
        if expected != actual:
            raise ValueError(f"store (layers, kv_heads, head_dim, dtype, device) {actual} does not fit {expected}")
        self.model = loaded.model
        self.store = store
        self.device = loaded.device
        # CPU fp32: small batches (decodes) run the linear layers on weights packed once (executor/native.py).
        self.linears = packed_linears(self.model) if self.device.type == "cpu" else None
        # The attention implementation is switched per call on the one config all modules share,
        # so the model stays a stock transformers model (generate() etc.) outside `forward`.
        assert all(getattr(m, "config", self.model.config) is self.model.config for m in self.model.modules())
        register_paged_attention()
        # The fused SDPA kernel that serves this model's masked attention (CUDA; checked once, reported).
        self.attention_backend = check_backend(loaded.torch_dtype, loaded.model.config.num_attention_heads,
                                               store.head_dim, self.device)
        if self.device.type == "cuda":
            log.info("attention: SDPA's %s kernel serves masked spans", self.attention_backend)

    @torch.inference_mode()
    def forward(self, seqs: Sequence[SeqInput], all_logits: bool = False) -> torch.Tensor:
        """Logits of each sequence's last query token, [num_seqs, vocab]; all query tokens' with `all_logits`."""
        if not seqs:
            raise ValueError("empty batch")
        meta = PagedAttentionMetadata.build(seqs, self.store)
        tokens = [t for seq in seqs for t in seq.token_ids]
        positions = [p for seq in seqs for p in seq.positions]
        ends = torch.tensor([len(seq.token_ids) for seq in seqs]).cumsum(0)
        input_ids = torch.tensor([tokens], dtype=torch.long, device=self.device)  # [1, total_q]
        position_ids = torch.tensor([positions], dtype=torch.long, device=self.device)  # [1, total_q]
        keep = 0 if all_logits else (ends - 1).to(self.device)  # 0 keeps all
        config = self.model.config
        previous = config._attn_implementation
        config._attn_implementation = PAGED_ATTENTION
        try:
            with self.linears.active() if self.linears is not None else contextlib.nullcontext():
                out = self.model(
                    input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=keep,
                    **{METADATA_KWARG: meta},
                )
        finally:
            config._attn_implementation = previous
        return out.logits[0]  # [num_seqs or total_q, vocab]


def sample(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token per row of `logits` [n, vocab]: greedy at temperature 0, else nucleus sampling. Returns [n]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [n, vocab]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
