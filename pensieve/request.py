"""Conversations and requests: ids, token counts and timestamps, never token values or tensors."""
from __future__ import annotations


class Conversation:
    """One conversation's token counts and where each of its KV chunks lives.

    `dev[i]` / `host[i]` hold chunk i's slot in the device / host tier, or -1. Chunks are in
    position order. The counters `d <= h <= b <= len(dev)` describe the layout in *eviction
    order* (position order for leading-first policies, reversed for trailing-first ones):
    [0, d) dropped | [d, h) host only | [h, b) on both tiers | [b, n) device only.
    Eviction only ever advances these counters, and restoring a conversation resets them, so
    the layout is monotone by construction and the dropped chunks are always a leading (or
    trailing) run.
    """

    __slots__ = ("id", "tokens", "kv_tokens", "dev", "host", "d", "h", "b", "last_active", "active")

    def __init__(self, conversation_id, now: float) -> None:
        self.id = conversation_id
        self.tokens = 0  # every token of the conversation so far (prompts and answers)
        self.kv_tokens = 0  # leading tokens whose KV has been computed; the rest is pending
        self.dev: list[int] = []
        self.host: list[int] = []
        self.d = self.h = self.b = 0
        self.last_active = now
        self.active = False  # a request of this conversation is admitted: its chunks are pinned

    @property
    def chunks(self) -> int:
        return len(self.dev)


class Request:
    """One turn of a conversation: its new prompt, its target output length and what it cost."""

    __slots__ = (
        "id", "conversation_id", "turn", "arrival", "prompt_tokens", "output_tokens",
        "conversation", "generated", "admitted", "first_token", "finish", "stopped_early",
        "history_tokens", "gpu_hit_tokens", "cpu_hit_tokens", "recomputed_tokens",
        "new_prompt_tokens", "swap_in_chunks", "suspensions", "resume_recomputed_tokens",
    )

    def __init__(self, request_id: int, conversation_id, turn: int, arrival: float,
                 prompt_tokens: int, output_tokens: int) -> None:
        if prompt_tokens < 1 and turn == 0:
            raise ValueError(f"request {request_id}: the first turn needs at least one prompt token")
        if prompt_tokens < 0 or output_tokens < 1:
            raise ValueError(
                f"request {request_id}: prompt_tokens must be >= 0 and output_tokens >= 1, "
                f"got {prompt_tokens} and {output_tokens}"
            )
        self.id = request_id
        self.conversation_id = conversation_id
        self.turn = turn
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.conversation: Conversation | None = None
        self.generated = 0
        self.admitted: float | None = None
        self.first_token: float | None = None
        self.finish: float | None = None
        self.stopped_early = False  # the backend saw EOS before output_tokens (chat mode)
        # Where the history's KV was found at first admission (tokens).
        self.history_tokens = 0
        self.gpu_hit_tokens = 0
        self.cpu_hit_tokens = 0
        self.recomputed_tokens = 0
        # Tokens computed for the first time: the new prompt plus the previous answer's last
        # token, whose KV no step has written yet.
        self.new_prompt_tokens = 0
        self.swap_in_chunks = 0
        self.suspensions = 0
        self.resume_recomputed_tokens = 0  # recomputation caused by suspension, kept apart

    @property
    def done(self) -> bool:
        return self.finish is not None

    def __repr__(self) -> str:
        return (f"Request(id={self.id}, conv={self.conversation_id}, turn={self.turn}, "
                f"prompt={self.prompt_tokens}, out={self.generated}/{self.output_tokens})")
