"""Conversations and requests: ids, token counts and timestamps, never token values or tensors."""
from __future__ import annotations


class StepClock:
    """Decode steps completed so far, the clock that running requests' token counters follow.

    Every running request decodes one token per step, so its `generated` and its conversation's
    `tokens` and `kv_tokens` all grow by one per step. Rather than adding 1 to each of them every
    step (the bulk of a step's bookkeeping at a hundred decodes), a counter that follows a clock
    reads `base + clock.ticks - since`: one tick advances them all, and the scheduler only has
    work for requests with something due (a new chunk, the end of the turn).
    """

    __slots__ = ("ticks",)

    def __init__(self) -> None:
        self.ticks = 0


# The clock of counters that are not advancing: it never ticks.
STILL = StepClock()


class Conversation:
    """One conversation's token counts and where each of its KV chunks lives.

    `dev[i]` / `host[i]` hold chunk i's slot in the device / host tier, or -1. Chunks are in
    position order. Three boundaries describe the layout in *eviction order* (see
    `pensieve.layout`: position order for leading-first policies, reversed for trailing-first
    ones), `drop_end <= host_end <= copy_end <= chunks`:
    [0, drop_end) dropped | [drop_end, host_end) host only | [host_end, copy_end) on both tiers |
    [copy_end, chunks) device only.
    Eviction only ever advances the boundaries, and restoring a conversation resets them, so the
    layout is monotone by construction and the dropped chunks are always a leading (or trailing)
    run. `released` numbers the conversation's latest release among all releases: the tie-break
    of retention order (the longer idle first).
    """

    __slots__ = ("id", "_tokens", "_kv_tokens", "_clock", "_since", "dev", "host", "drop_end", "host_end", "copy_end",
                 "last_active", "released", "active")

    def __init__(self, conversation_id, now: float) -> None:
        self.id = conversation_id
        self._clock, self._since = STILL, 0
        self._tokens = 0
        self._kv_tokens = 0
        self.dev: list[int] = []
        self.host: list[int] = []
        self.drop_end = self.host_end = self.copy_end = 0
        self.last_active = now
        self.released = -1  # never released yet
        self.active = False  # a request of this conversation is admitted: its chunks are pinned

    @property
    def tokens(self) -> int:
        """Every token of the conversation so far (prompts and answers)."""
        return self._tokens + self._clock.ticks - self._since

    @tokens.setter
    def tokens(self, value: int) -> None:
        self._tokens = value - self._clock.ticks + self._since

    @property
    def kv_tokens(self) -> int:
        """Leading tokens whose KV has been computed; the rest is pending."""
        return self._kv_tokens + self._clock.ticks - self._since

    @kv_tokens.setter
    def kv_tokens(self, value: int) -> None:
        self._kv_tokens = value - self._clock.ticks + self._since

    def follow(self, clock: StepClock) -> None:
        """Let the token counters follow `clock` from now on (STILL: stop them), keeping their values."""
        self._tokens, self._kv_tokens = self.tokens, self.kv_tokens
        self._clock, self._since = clock, clock.ticks

    @property
    def chunks(self) -> int:
        return len(self.dev)


class Request:
    """One turn of a conversation: its new prompt, its target output length and what it cost."""

    __slots__ = (
        "id", "conversation_id", "turn", "arrival", "prompt_tokens", "output_tokens",
        "conversation", "_generated", "_clock", "_since", "grow_at", "finish_at", "admitted", "first_token", "finish", "stopped_early",
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
        self._clock, self._since = STILL, 0
        self._generated = 0
        # While it decodes: the step clock's readings at which it needs its next chunk and at
        # which its turn ends (the scheduler's due lists are keyed by them).
        self.grow_at = self.finish_at = -1
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
    def generated(self) -> int:
        return self._generated + self._clock.ticks - self._since

    @generated.setter
    def generated(self, value: int) -> None:
        self._generated = value - self._clock.ticks + self._since

    @property
    def decoding(self) -> bool:
        """Whether its counters follow the scheduler's step clock (it decodes every step)."""
        return self._clock is not STILL

    def follow(self, clock: StepClock) -> None:
        """Let `generated` follow `clock` from now on (STILL: stop it), keeping its value."""
        self._generated = self.generated
        self._clock, self._since = clock, clock.ticks

    @property
    def done(self) -> bool:
        return self.finish is not None

    def __repr__(self) -> str:
        return (f"Request(id={self.id}, conv={self.conversation_id}, turn={self.turn}, "
                f"prompt={self.prompt_tokens}, out={self.generated}/{self.output_tokens})")
