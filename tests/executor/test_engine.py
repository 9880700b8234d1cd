"""The engine must serve multi-turn conversations exactly as stateless recompute and transformers'
`generate` on the full history do: every policy, caches small enough to swap, drop and suspend."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from executor.conversations import CONVERSATIONS
from executor.engine import Engine, EngineConfig
from executor.models import LoadedModel, load_model
from executor.tokenizer import chat_prompt_ids
from pensieve.config import SchedulerConfig
from pensieve.cost import LinearCostModel
from pensieve.plan import StepPlan
from pensieve.policies import REGISTRY

TINY_PRESETS = ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-opt"]
POLICIES = list(REGISTRY)
CHUNK = 8  # small chunks: short conversations span many of them
# (device slots, host slots): host room for many swap-ins, and a host so small the device drops.
TINY_CACHES = [(16, 12), (20, 4)]
# What each policy must have done over TINY_CACHES; a leading drop + new prompt shows as a split prefill.
EXPECTED_EVENTS = {
    "pensieve": {"swap_out", "swap_in", "drop", "split_prefill_with_decodes"},
    "lru": {"swap_out", "swap_in", "drop", "split_prefill_with_decodes"},
    "pensieve-gpu": {"drop", "split_prefill_with_decodes"},
    "conversation-lru": {"swap_out", "swap_in", "drop"},
    "trailing-lru": {"swap_out", "swap_in", "drop"},
    "stateless": {"drop"},
    **{leading: {"swap_out", "swap_in", "drop", "split_prefill_with_decodes"} for leading in ("lfu", "slru", "arc", "tlru")},
    **{trailing: {"swap_out", "swap_in", "drop"} for trailing in ("trailing-tlru", "session-aware")},
}


@dataclass(frozen=True)
class Workload:
    """Conversations whose turns arrive once the previous one finished, while others are running."""

    prompts: list[list[list[int]]]  # [conversation][turn] -> prompt token ids
    new_tokens: int
    starts: list[int]  # the step at which each conversation's first turn arrives
    think_steps: int = 1  # steps between a turn finishing and the next one arriving


@dataclass
class Served:
    ids: dict[int, list[int]]  # conversation -> all its token ids
    plans: list[StepPlan]
    engine: Engine

    def events(self) -> set[str]:
        stats = self.engine.cache.stats
        found = {name for name, count in [("swap_out", stats.swap_out_chunks), ("swap_in", stats.swap_in_chunks),
                                          ("drop", stats.dropped_chunks)] if count}
        if any(p.decodes and any(len(item.spans) > 1 for item in p.prefills) for p in self.plans):
            found.add("split_prefill_with_decodes")
        return found


def serve(engine: Engine, workload: Workload) -> Served:
    """Drive the engine step by step on a step-count clock (deterministic eviction order)."""
    n = len(workload.prompts)
    next_turn, ready, busy = [0] * n, list(workload.starts), [False] * n
    plans: list[StepPlan] = []
    step = 0
    while True:
        for c in range(n):
            if not busy[c] and next_turn[c] < len(workload.prompts[c]) and ready[c] <= step:
                engine.add_request(c, workload.prompts[c][next_turn[c]], workload.new_tokens, float(step))
                next_turn[c] += 1
                busy[c] = True
        if engine.scheduler.idle and not any(next_turn[c] < len(workload.prompts[c]) for c in range(n)):
            break
        step += 1
        plan, finished = engine.step(float(step))
        engine.cache.check_invariants()
        plans.append(plan)
        for request in finished:
            assert len(engine.generated_ids(request.id)) == workload.new_tokens
            busy[request.conversation_id] = False
            ready[request.conversation_id] = step + workload.think_steps
    return Served({c: engine.conversation_ids(c) for c in range(n)}, plans, engine)


def generate_reference(model: torch.nn.Module, workload: Workload) -> dict[int, list[int]]:
    """Each conversation turn by turn through `model.generate` (greedy, EOS ignored) on its full history."""
    out = {}
    for c, prompts in enumerate(workload.prompts):
        ids: list[int] = []
        for prompt in prompts:
            ids += prompt
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=workload.new_tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
            ids += y[0, len(ids):].tolist()
        out[c] = ids
    return out


def random_prompts(lengths: list[list[int]], seed: int = 0, vocab: int = 512) -> list[list[list[int]]]:
    """Random token ids away from the special ids 0-2."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(3, vocab, (n,), generator=g).tolist() for n in conv] for conv in lengths]


TINY_WORKLOAD = Workload(
    prompts=random_prompts([[5 + 3 * c + 2 * t for t in range(3)] for c in range(4)]),
    new_tokens=8, starts=[0, 3, 6, 9],
)


def tiny_engine(loaded: LoadedModel, policy: str, device_slots: int, host_slots: int, scheduler: dict | None = None,
                **kwargs) -> Engine:
    return Engine(loaded, EngineConfig(policy=policy, device_slots=device_slots, host_slots=host_slots,
                                       chunk_tokens=CHUNK, scheduler=SchedulerConfig(**(scheduler or {})), **kwargs))


_TINY_REFERENCES: dict[str, dict[int, list[int]]] = {}


def tiny_reference(preset: str, loaded: LoadedModel) -> dict[int, list[int]]:
    """`generate`'s tokens for TINY_WORKLOAD, checked once per preset against a stateless engine with ample room."""
    if preset not in _TINY_REFERENCES:
        expected = generate_reference(loaded.model, TINY_WORKLOAD)
        assert serve(tiny_engine(loaded, "stateless", 64, 0), TINY_WORKLOAD).ids == expected
        _TINY_REFERENCES[preset] = expected
    return _TINY_REFERENCES[preset]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_every_policy_equals_stateless_and_generate(preset: str, policy: str,
                                                    tiny_model: Callable[[str], LoadedModel]) -> None:
    loaded = tiny_model(preset)
    expected = tiny_reference(preset, loaded)
    events: set[str] = set()
    for device_slots, host_slots in TINY_CACHES:
        served = serve(tiny_engine(loaded, policy, device_slots, host_slots), TINY_WORKLOAD)
        assert served.ids == expected, (device_slots, host_slots)
        events |= served.events()
    assert events >= EXPECTED_EVENTS[policy]
    if not REGISTRY[policy].uses_host_tier:
        assert not events & {"swap_out", "swap_in"}


def test_logits_match_a_stateless_forward_at_every_step(tiny_model: Callable[[str], LoadedModel]) -> None:
    loaded = tiny_model("tiny-llama")
    engine = tiny_engine(loaded, "pensieve", *TINY_CACHES[1])
    captured: list[tuple[list[int], torch.Tensor]] = []  # (the ids the logits predict after, [vocab])

    def hook(request_ids: list[int], logits: torch.Tensor) -> None:
        for rid, row in zip(request_ids, logits):
            captured.append((engine.conversation_ids(engine.requests[rid].conversation_id), row.clone()))

    engine.logits_hook = hook
    served = serve(engine, TINY_WORKLOAD)
    assert "split_prefill_with_decodes" in served.events()
    assert len(captured) == sum(len(p) for p in TINY_WORKLOAD.prompts) * TINY_WORKLOAD.new_tokens
    with torch.inference_mode():
        for ids, row in captured:
            expected = loaded.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            torch.testing.assert_close(row, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("policy", ["pensieve", "pensieve-gpu", "trailing-lru", "stateless"])
def test_decodes_out_of_device_slots_suspend_and_resume(policy: str,
                                                        tiny_model: Callable[[str], LoadedModel]) -> None:
    # Three 12-token prompts fit 6 of 9 slots; growing to 32 tokens each would take 12, so decodes
    # run out of slots: the latest arrival is suspended and later resumes as a prefill of its pending
    # token (and of any chunk dropped meanwhile).
    workload = Workload(random_prompts([[12, 4], [12, 5], [12, 3]], seed=3), new_tokens=20, starts=[0, 0, 0])
    loaded = tiny_model("tiny-llama")
    served = serve(tiny_engine(loaded, policy, 9, 4, scheduler={"decode_reserve": 0.0}), workload)
    assert served.engine.scheduler.suspensions > 0
    ran: set[int] = set()
    resumed = set()  # requests that ran, were suspended, and came back as a prefill of their pending token(s)
    for plan in served.plans:
        resumed |= {item.request_id for item in plan.prefills} & ran
        ran |= set(plan.decodes) | {item.request_id for item in plan.prefills}
    assert resumed
    roomy = serve(tiny_engine(loaded, "stateless", 64, 0), workload)
    assert roomy.engine.scheduler.suspensions == 0
    assert served.ids == roomy.ids == generate_reference(loaded.model, workload)


def test_eos_stops_a_turn_and_the_next_turn_continues_after_it(tiny_model: Callable[[str], LoadedModel]) -> None:
    loaded = tiny_model("tiny-llama")
    prompts = random_prompts([[9, 6]], seed=5)
    first = generate_reference(loaded.model, Workload([prompts[0][:1]], 1, [0]))[0][-1]
    engine = Engine(loaded, EngineConfig(device_slots=16, host_slots=4, chunk_tokens=CHUNK),
                    eos_token_ids=frozenset({first}))
    stopped = engine.add_request("a", prompts[0][0], 8, 0.0, stop_at_eos=True)
    other = engine.add_request("b", prompts[0][0], 3, 0.0)  # samples the same token but ignores EOS
    engine.run_until_idle()
    assert engine.generated_ids(stopped.id) == [first] and stopped.stopped_early
    assert len(engine.generated_ids(other.id)) == 3 and not other.stopped_early
    second = engine.add_request("a", prompts[0][1], 5, 1.0)
    engine.run_until_idle()
    assert engine.prompt_start[second.id] == len(prompts[0][0]) + 1 and engine.last_step_s > 0
    history = prompts[0][0] + [first] + prompts[0][1]  # the EOS stays in the history
    assert engine.conversation_ids("a") == generate_reference(loaded.model, Workload([[history]], 5, [0]))[0]


def test_seeded_sampling_is_reproducible(tiny_model: Callable[[str], LoadedModel]) -> None:
    def run(seed: int) -> dict[int, list[int]]:
        engine = tiny_engine(tiny_model("tiny-qwen2"), "pensieve", *TINY_CACHES[0], temperature=1.0, top_p=0.9,
                             seed=seed)
        return serve(engine, TINY_WORKLOAD).ids

    assert run(1) == run(1) != run(2)


def test_bad_requests_fail_before_any_work_and_change_nothing(tiny_model: Callable[[str], LoadedModel]) -> None:
    loaded = tiny_model("tiny-llama")  # context 1024 tokens
    engine = tiny_engine(loaded, "pensieve", 4, 4)  # 4 chunks of 8 tokens on the device
    with pytest.raises(ValueError, match=r"1030 tokens, over the 1024-token context.*shorten the prompt"):
        engine.add_request("a", [5] * 1000, 30, 0.0)
    with pytest.raises(ValueError, match=r"need 5 KV chunks .* holds only 4 .*enlarge the device cache"):
        engine.add_request("a", [5] * 30, 3, 0.0)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        engine.add_request("a", [5, 512], 3, 0.0)
    with pytest.raises(ValueError, match="first turn needs at least one prompt token"):
        engine.add_request("a", [], 3, 0.0)
    assert engine.conversation_ids("a") == [] and engine.scheduler.idle and not engine.requests

    request = engine.add_request("a", [5, 6, 7], 4, 0.0)
    with pytest.raises(ValueError, match="unfinished turn"):
        engine.add_request("a", [8], 2, 0.0)
    with pytest.raises(ValueError, match="unfinished turn"):
        engine.end_conversation("a")
    engine.run_until_idle()
    assert engine.conversation_ids("a")[:3] == [5, 6, 7] and len(engine.generated_ids(request.id)) == 4
    engine.end_conversation("a")  # its chunks are freed and its history forgotten
    assert engine.conversation_ids("a") == [] and engine.cache.device.used == 0
    assert engine.add_request("a", [9], 1, 1.0).turn == 0

    with pytest.raises(ValueError, match=r"holds no 8-token KV chunk.*give the device cache \(--gpu-cache\) at least"):
        Engine(loaded, EngineConfig(device_cache_gb=1e-6, chunk_tokens=CHUNK))
    with pytest.raises(ValueError, match="unknown policy"):
        Engine(loaded, EngineConfig(policy="fifo", device_slots=4))


def test_tiers_are_sized_in_gb_and_the_store_matches_the_cache(tiny_model: Callable[[str], LoadedModel]) -> None:
    loaded = tiny_model("tiny-llama")  # 3 layers x 2 KV heads x 16 dims x fp32: 768 bytes per token
    cost = LinearCostModel(1e-6, 1e-3)
    engine = Engine(loaded, EngineConfig(device_cache_gb=100.5 * 24576 / 1e9, host_cache_gb=0.001), cost_model=cost)
    assert engine.bytes_per_chunk == 24576 == engine.store.bytes_per_chunk
    assert (engine.cache.device.capacity, engine.cache.host.capacity) == (100, 40)
    assert (engine.store.device_slots, engine.store.host_slots) == (100, 40)
    assert engine.cache.policy.cost_model is cost
    no_host = Engine(loaded, EngineConfig(policy="pensieve-gpu", device_slots=8, host_slots=8))
    assert no_host.cache.host.capacity == no_host.store.host_slots == 0


@functools.cache
def smollm2() -> LoadedModel:
    """The built-in SmolLM2-135M-Instruct GGUF, loaded once for every test that needs it."""
    return load_model(None)


def smollm2_workload(tokenizer) -> Workload:
    """Three chats of three turns from the built-in conversations, in the model's chat template."""
    prompts = []
    for texts in CONVERSATIONS[:3]:
        messages: list[dict[str, str]] = []
        history: list[int] = []
        turns = []
        for text in texts[:3]:
            messages.append({"role": "user", "content": text})
            turns.append(chat_prompt_ids(tokenizer, messages, history, frozenset({tokenizer.eos_token_id})))
            history += turns[-1] + [0]  # only whether the history is empty matters here
            messages.append({"role": "assistant", "content": ""})
        prompts.append(turns)
    return Workload(prompts, new_tokens=4, starts=[0, 2, 4])


def test_smollm2_gguf_multi_turn_equals_stateless_and_generate(no_network) -> None:
    loaded = smollm2()
    workload = smollm2_workload(loaded.tokenizer)
    # 8 device slots of 32 tokens for three ~110-token chats, 2 host slots: swaps, drops, leading recomputes
    # (with exact retention order, 7 slots no longer give a recompute span split from its prompt beside decodes).
    served = serve(Engine(loaded, EngineConfig(policy="pensieve", device_slots=8, host_slots=2)), workload)
    assert served.events() >= EXPECTED_EVENTS["pensieve"]
    stateless = serve(Engine(loaded, EngineConfig(policy="stateless", device_slots=16, host_slots=0)), workload)
    assert served.ids == stateless.ids == generate_reference(loaded.model, workload)
