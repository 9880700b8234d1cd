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

    Copies run in this order: swap-outs (device -> host), then swap-ins (host -> device), then
    the forward pass, because a slot freed by a swap-out may be refilled by a swap-in.
    """

    index: int
    decodes: list[int]  # request ids; each computes one token at position kv_tokens of its conversation
    decode_context_tokens: int  # sum over decodes of their context length (for cost models)
    prefills: list[PrefillItem]
    swap_out: list[tuple[int, int]]  # (device slot, host slot)
    swap_in: list[tuple[int, int]]  # (host slot, device slot)
    dropped_chunks: int = 0
    suspended: list[int] = field(default_factory=list)

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
