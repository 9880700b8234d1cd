"""What one step runs and what came back: ids and counts only, never tensors."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class PrefillItem:
    """A request computing more than one token this step: a new turn, or a resumed one.

    `spans` are (start position, length) runs of query tokens in ascending order: recomputed
    dropped chunks (a leading run for leading-first policies) and the pending tokens (the
    previous answer's last token and the new prompt). Each query token attends to every KV
    position of its conversation up to its own; the backend writes a span's KV before attending.
    """

    request_id: int
    conversation_id: object
    spans: list[tuple[int, int]]
    context_tokens: int  # KV length of the conversation once this step has run

    @property
    def query_tokens(self) -> int:
        return sum(length for _, length in self.spans)


@dataclass(slots=True)
class StepPlan:
    """One iteration of the unified batch, and the cache copies to carry out before it runs.

    `swap_out` lists the swap-outs whose device slots this step refills first (a swap-in or a new
    chunk takes the slot they empty), then the last `swap_out_ahead` of them: ahead-of-time copies
    of idle chunks, whose device copies stay. A backend must finish a refilled slot's swap-out before
    writing the slot; swap-ins have priority over ahead-of-time copies (the paper's order; the cost
    model charges swap-out only for idle link time). Per layer: that layer's urgent swap-outs, its
    swap-ins, then the forward may use it; ahead-of-time copies after.
    """

    index: int
    decodes: list[int]  # request ids; each computes one token at position kv_tokens of its conversation
    decode_context_tokens: int  # sum over decodes of their context length (for cost models)
    prefills: list[PrefillItem]
    swap_out: list[tuple[int, int]]  # (device slot, host slot)
    swap_in: list[tuple[int, int]]  # (host slot, device slot)
    dropped_chunks: int = 0
    suspended: list[int] = field(default_factory=list)
    swap_out_ahead: int = 0  # the last this many of swap_out are ahead-of-time copies

    @property
    def urgent_swap_out(self) -> list[tuple[int, int]]:
        """Swap-outs whose device slots this step refills."""
        return self.swap_out[:len(self.swap_out) - self.swap_out_ahead]

    @property
    def ahead_swap_out(self) -> list[tuple[int, int]]:
        """Ahead-of-time copies: the device copy stays; nothing this step writes their slots."""
        return self.swap_out[len(self.swap_out) - self.swap_out_ahead:]

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(p.query_tokens for p in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


@dataclass(slots=True)
class StepResult:
    """What a backend reports: sampled tokens (real runs), requests that hit EOS, elapsed time."""

    tokens: dict[int, int] | None = None
    stopped: frozenset[int] = frozenset()
    duration_s: float = 0.0
