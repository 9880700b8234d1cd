"""The serving engine: the pensieve core's loop (schedule, execute, complete) driving a real model.

The core counts tokens and decides where every KV chunk lives; the engine keeps the token ids,
carries out each plan's copies on the paged KV store, runs one forward for the whole unified
batch and samples one token per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from executor.cpu import tune_allocator
from executor.kv_store import PagedKVStore
from executor.models import LoadedModel
from executor.runner import ModelRunner, SeqInput, sample
from pensieve.config import SchedulerConfig
from pensieve.core import build_core
from pensieve.cost import CostModel, LinearCostModel
from pensieve.models import DTYPE_BYTES
from pensieve.plan import StepPlan, StepResult
from pensieve.request import Request
from pensieve.tiers import slots_for

# (request ids in batch order, their logits [n, vocab]) after every forward: tests compare logits.
LogitsHook = Callable[[list[int], torch.Tensor], None]
# Called with each token a request samples, in the step that samples it; True ends the request with
# that token (a stop string completed, say), as EOS would.
StopCheck = Callable[[int], bool]


@dataclass(frozen=True)
class Sampling:
    """One request's own sampling settings (a served API request's), instead of the engine's.

    `seed`: the request draws from its own generator, so its tokens do not depend on what else is
    batched with it. `min_tokens`: EOS cannot be sampled before that many tokens (vLLM's meaning).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.min_tokens < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and min_tokens >= 0, got {self.temperature}, "
                             f"{self.top_p} and {self.min_tokens}")


@dataclass(frozen=True)
class EngineConfig:
    """Cache, scheduler and sampling settings. Slot counts, when given, override the sizes in GB."""

    policy: str = "pensieve"
    device_cache_gb: float = 1.0
    host_cache_gb: float = 2.0
    device_slots: int | None = None  # tests size tiers in chunks, which GB cannot state exactly
    host_slots: int | None = None
    chunk_tokens: int = 32
    scheduler: SchedulerConfig = SchedulerConfig()  # batch budgets, decode reserve, ahead-of-time swap-out
    policy_params: dict = field(default_factory=dict)  # the policy's constructor arguments (cache.policy.params)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


def kv_bytes_per_token(dims: dict) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x dtype bytes."""
    return 2 * dims["layers"] * dims["kv_heads"] * dims["head_dim"] * DTYPE_BYTES[dims["dtype"]]


def core_for(config: EngineConfig, device_slots: int, host_slots: int, max_context: int,
             cost_model: CostModel | None, bytes_per_chunk: int):
    """The core an engine serves with, built by the same factory as the simulator's."""
    return build_core(policy=config.policy, policy_params=config.policy_params,
                      cost_model=cost_model or LinearCostModel(), device_slots=device_slots, host_slots=host_slots,
                      chunk_tokens=config.chunk_tokens, max_context=max_context, scheduler=config.scheduler,
                      bytes_per_chunk=bytes_per_chunk)


def model_eos_ids(loaded: LoadedModel) -> frozenset[int]:
    """EOS ids from the tokenizer and the model's generation config (which may list several)."""
    ids: set[int] = set()
    sources = [getattr(loaded.tokenizer, "eos_token_id", None), loaded.model.config.eos_token_id]
    generation = getattr(loaded.model, "generation_config", None)
    if generation is not None:
        sources.append(generation.eos_token_id)
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return frozenset(ids)


class Engine:
    """Serves multi-turn conversations on one model with the pensieve core's two-tier KV cache."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig(), *,
                 eos_token_ids: frozenset[int] | None = None, cost_model: CostModel | None = None) -> None:
        """`eos_token_ids` default to the model's; `cost_model` gives the policy its Cost(l) (default: linear)."""
        self.loaded = loaded
        self.config = config
        dims = loaded.dims
        ct = config.chunk_tokens
        self.bytes_per_chunk = kv_bytes_per_token(dims) * ct
        device_slots, host_slots = config.device_slots, config.host_slots
        if device_slots is None:
            device_slots = slots_for(config.device_cache_gb, self.bytes_per_chunk)
        if host_slots is None:
            host_slots = slots_for(config.host_cache_gb, self.bytes_per_chunk)
        if device_slots < 1:
            raise ValueError(
                f"a device cache of {config.device_cache_gb} GB holds no {ct}-token KV chunk of model "
                f"{loaded.name} ({self.bytes_per_chunk / 1e6:.3f} MB each); give the device cache (--gpu-cache) "
                f"at least {self.bytes_per_chunk / 1e9:.6f} GB, and room for whole conversations"
            )
        self.max_context = dims["max_context"]
        self.scheduler = core_for(config, device_slots, host_slots, self.max_context, cost_model, self.bytes_per_chunk)
        cache = self.cache = self.scheduler.cache
        if loaded.device.type == "cpu":
            tune_allocator()  # before the first step's temporaries: see executor/cpu.py
        # Sized from the cache, not the config: policies without a host tier get no host pool.
        self.store = PagedKVStore.for_model(dims, cache.device.capacity, cache.host.capacity, ct, loaded.device)
        assert self.store.bytes_per_chunk == self.bytes_per_chunk
        self.runner = ModelRunner(loaded, self.store)
        self.eos_token_ids = model_eos_ids(loaded) if eos_token_ids is None else eos_token_ids
        self.generator = torch.Generator(loaded.device).manual_seed(config.seed)
        self.logits_hook: LogitsHook | None = None
        self.requests: dict[int, Request] = {}  # every request ever added, finished ones too
        self.prefill_s: dict[int, float] = {}  # duration of the step that produced a request's first token
        self.prompt_start: dict[int, int] = {}  # where a request's prompt begins in its conversation's ids
        self.last_step_s = 0.0  # wall time of the latest executed step
        self._ids: dict[Hashable, list[int]] = {}  # conversation -> all its token ids (prompts and answers)
        self._generated: dict[int, list[int]] = {}
        self._stop_at_eos: set[int] = set()
        self._sampling: dict[int, Sampling] = {}  # requests with their own sampling settings
        self._generators: dict[int, torch.Generator] = {}  # seeded requests' own generators
        self._stop_checks: dict[int, StopCheck] = {}
        self._cancelled: set[int] = set()  # to end at the next token they sample
        self._turns: dict[Hashable, int] = {}
        self._next_id = 0

    # ------------------------------------------------------------------ intake
    def add_request(self, conversation_id: Hashable, prompt_ids: Sequence[int], max_new_tokens: int,
                    arrival: float, stop_at_eos: bool = False, turn: int | None = None, *,
                    sampling: Sampling | None = None, stop_check: StopCheck | None = None) -> Request:
        """Queue the next turn of a conversation: `prompt_ids` follow its history, up to `max_new_tokens` come back.

        `sampling`: the request's own settings (default: the engine's). `stop_check`: see `StopCheck`.
        Raises ValueError, changing nothing, when the turn cannot fit the model's context or the device tier.
        """
        prompt = [int(t) for t in prompt_ids]
        vocab = self.loaded.dims["vocab_size"]
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"conversation {conversation_id!r}: prompt token ids must be in [0, {vocab})")
        history = len(self._ids.get(conversation_id, ()))
        self._check_fits(conversation_id, history, len(prompt), max_new_tokens)
        turn = self._turns.get(conversation_id, 0) if turn is None else turn
        request = Request(self._next_id, conversation_id, turn, arrival, len(prompt), max_new_tokens)
        self.scheduler.add_request(request)  # validates too; raises before changing anything
        self._next_id += 1
        ids = self._ids.setdefault(conversation_id, [])
        self.prompt_start[request.id] = len(ids)
        ids.extend(prompt)
        assert request.conversation.tokens == len(ids), (request.conversation.tokens, len(ids))
        self.requests[request.id] = request
        self._generated[request.id] = []
        if stop_at_eos:
            self._stop_at_eos.add(request.id)
        if sampling is not None and not self._engine_default(sampling):
            self._sampling[request.id] = sampling
            if sampling.seed is not None:
                self._generators[request.id] = torch.Generator(self.loaded.device).manual_seed(sampling.seed)
        if stop_check is not None:
            self._stop_checks[request.id] = stop_check
        self._turns[conversation_id] = turn + 1
        return request

    def _engine_default(self, sampling: Sampling) -> bool:
        """Whether `sampling` draws what the engine's own settings do: such requests keep the batched path."""
        cfg = self.config
        return (sampling.temperature, sampling.top_p, sampling.min_tokens) == (cfg.temperature, cfg.top_p, 0) and (
            sampling.seed is None or sampling.temperature == 0)  # greedy needs no generator

    def cancel(self, request_id: int) -> None:
        """End a request at the next token it samples (its client went away). Everything up to that
        token stays in its conversation's history, as after EOS: the core's bookkeeping never sees a
        half-done step. A request that has not started yet still runs its prefill first."""
        if request_id in self.requests and not self.requests[request_id].done:
            self._cancelled.add(request_id)

    def _check_fits(self, conversation_id: Hashable, history: int, prompt: int, max_new_tokens: int) -> None:
        total = history + prompt + max_new_tokens
        if total > self.max_context:
            raise ValueError(
                f"conversation {conversation_id!r}: {history} history + {prompt} prompt + {max_new_tokens} new "
                f"tokens = {total} tokens, over the {self.max_context}-token context of model "
                f"{self.loaded.name}; shorten the prompt, lower max_new_tokens or start a new conversation"
            )
        ct, capacity = self.cache.chunk_tokens, self.cache.device.capacity
        chunks = -(-total // ct)
        if chunks > capacity:
            raise ValueError(
                f"conversation {conversation_id!r}: its {total} tokens need {chunks} KV chunks "
                f"({chunks * self.bytes_per_chunk / 1e9:.3g} GB) on the device tier, which holds only "
                f"{capacity} ({capacity * self.bytes_per_chunk / 1e9:.3g} GB); enlarge the device cache "
                f"(--gpu-cache) to at least {chunks * self.bytes_per_chunk / 1e9:.3g} GB or shorten the turn"
            )

    # ------------------------------------------------------------------ the loop
    def step(self, now: float) -> tuple[StepPlan, list[Request]]:
        """One iteration: the core plans, the model runs, the core applies the sampled tokens.

        Tokens exist once the step has run, so completion is stamped at `now` plus the step's
        own duration, as the simulator stamps it at the end of the step's simulated time.
        """
        plan = self.scheduler.schedule(now)
        result = self.execute(plan)
        finished = self.scheduler.complete(plan, result, now + result.duration_s)
        self._record(plan, result)
        for request in finished:
            self._forget_request_settings(request.id)
        return plan, finished

    def forget_request(self, request_id: int) -> None:
        """Drop what is kept of a finished request (its tokens stay in its conversation): a server
        that runs for days keeps nothing per request."""
        if request_id in self.scheduler.requests:
            raise ValueError(f"request {request_id} has not finished")
        for table in (self.requests, self.prefill_s, self.prompt_start, self._generated):
            table.pop(request_id, None)

    def _forget_request_settings(self, request_id: int) -> None:
        for table in (self._sampling, self._generators, self._stop_checks):
            table.pop(request_id, None)
        self._cancelled.discard(request_id)
        self._stop_at_eos.discard(request_id)

    def run_until_idle(self, clock: Callable[[], float] = time.perf_counter) -> list[Request]:
        """Step until no request waits or runs, reading `now` from `clock`; the requests that finished."""
        finished: list[Request] = []
        while not self.scheduler.idle:
            plan, done = self.step(clock())
            if plan.empty:  # with work pending the core always runs something; otherwise this never ends
                raise RuntimeError(f"the scheduler planned an empty step with {len(self.scheduler.waiting)} "
                                   f"waiting and {len(self.scheduler.running)} running requests")
            finished += done
        return finished

    def execute(self, plan: StepPlan) -> StepResult:
        """The backend: the plan's copies (in `copy_order`), one forward, one sampled token per request."""
        start = time.perf_counter()
        self.store.copy_step(plan.urgent_swap_out, plan.swap_in, plan.ahead_swap_out)
        request_ids, seqs = self._batch(plan)
        tokens: dict[int, int] = {}
        if seqs:
            logits = self.runner.forward(seqs)  # [n, vocab]
            if self.logits_hook is not None:
                self.logits_hook(request_ids, logits)
            if any(rid in self._sampling for rid in request_ids):
                sampled = self._sample_each(request_ids, logits)
            else:
                cfg = self.config
                sampled = sample(logits, cfg.temperature, cfg.top_p, self.generator).tolist()  # syncs the device
            tokens = dict(zip(request_ids, sampled))
        elif self.store.device.type == "cuda":
            self.store.synchronize()  # a copies-only step: its time is the copies'
        stopped = frozenset(rid for rid, t in tokens.items() if self._stops(rid, t))
        self.last_step_s = time.perf_counter() - start
        return StepResult(tokens, stopped, self.last_step_s)

    def _stops(self, request_id: int, token: int) -> bool:
        """Whether `token` ends its request early: EOS (when asked), its stop check, or a cancellation."""
        check = self._stop_checks.get(request_id)
        stop = check is not None and check(token)  # called for every token: it follows the text
        return (stop or request_id in self._cancelled
                or (request_id in self._stop_at_eos and token in self.eos_token_ids))

    def _sample_each(self, request_ids: list[int], logits: torch.Tensor) -> list[int]:
        """Row by row, each request with its own settings and generator (served API requests)."""
        out = []
        for row, rid in enumerate(request_ids):
            own = self._sampling.get(rid)
            if own is None:
                cfg = self.config
                out.append(int(sample(logits[row:row + 1], cfg.temperature, cfg.top_p, self.generator)))
                continue
            row_logits = logits[row:row + 1]
            if own.min_tokens and len(self._generated[rid]) < own.min_tokens and self.eos_token_ids:
                row_logits = row_logits.clone()
                row_logits[0, sorted(self.eos_token_ids)] = float("-inf")
            generator = self._generators.get(rid, self.generator)
            out.append(int(sample(row_logits, own.temperature, own.top_p, generator)))
        return out

    def _batch(self, plan: StepPlan) -> tuple[list[int], list[SeqInput]]:
        """The forward's sequences: decodes (one token at position kv_tokens), then prefills (their spans)."""
        requests = self.scheduler.requests
        request_ids: list[int] = []
        seqs: list[SeqInput] = []
        for rid in plan.decodes:
            conv = requests[rid].conversation
            pos = conv.kv_tokens
            seqs.append(SeqInput([self._ids[conv.id][pos]], [pos], list(conv.dev), pos + 1))
            request_ids.append(rid)
        for item in plan.prefills:
            conv = requests[item.request_id].conversation
            ids = self._ids[conv.id]
            positions = [p for start, length in item.spans for p in range(start, start + length)]
            assert positions[-1] == item.context_tokens - 1 == len(ids) - 1, (item, len(ids))
            seqs.append(SeqInput([ids[p] for p in positions], positions, list(conv.dev), item.context_tokens))
            request_ids.append(item.request_id)
        return request_ids, seqs

    def _record(self, plan: StepPlan, result: StepResult) -> None:
        """Append every sampled token to its conversation and request, as the core has just counted it."""
        tokens = result.tokens or {}
        prefills = [item.request_id for item in plan.prefills]
        for rid in plan.decodes + prefills:
            request = self.requests[rid]
            ids = self._ids[request.conversation_id]
            ids.append(tokens[rid])
            self._generated[rid].append(tokens[rid])
            assert request.conversation.tokens == len(ids), (rid, request.conversation.tokens, len(ids))
            if rid in prefills and rid not in self.prefill_s:
                self.prefill_s[rid] = result.duration_s

    def end_conversation(self, conversation_id: Hashable) -> None:
        """Forget a conversation that will not return: its KV chunks on both tiers and its token ids."""
        self._check_idle(conversation_id)
        self.cache.forget(conversation_id)
        self._ids.pop(conversation_id, None)
        self._turns.pop(conversation_id, None)

    def truncate_conversation(self, conversation_id: Hashable, tokens: int) -> int:
        """Let an idle conversation go on from its first `tokens` token ids only (its client changed a
        later message); the KV of the rest is freed. Returns the tokens whose KV is kept (the others
        are computed with the next prompt): a continuation never attends to a token it did not send."""
        self._check_idle(conversation_id)
        ids = self._ids.get(conversation_id, [])
        if not 0 <= tokens <= len(ids):
            raise ValueError(f"conversation {conversation_id!r} has {len(ids)} tokens; cannot keep {tokens}")
        kept = self.cache.truncate(conversation_id, tokens)
        del ids[tokens:]
        return kept

    def _check_idle(self, conversation_id: Hashable) -> None:
        if any(r.conversation_id == conversation_id for r in self.scheduler.requests.values()):
            raise ValueError(f"conversation {conversation_id!r} has an unfinished turn")

    # ------------------------------------------------------------------ results
    def generated_ids(self, request_id: int) -> list[int]:
        """The tokens a request has sampled so far (a stopped one ends with its EOS)."""
        return list(self._generated[request_id])

    def conversation_ids(self, conversation_id: Hashable) -> list[int]:
        """All token ids of a conversation so far: every prompt and every sampled token."""
        return list(self._ids.get(conversation_id, ()))
