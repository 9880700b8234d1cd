"""The first prototype's Python API: chat turns on kept token ids, stateful against stateless, statistics."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from executor.models import LoadedModel
from executor.cpu import serving_threads
from executor.server import create_server, default_cache_gb
from executor.tokenizer import ByteTokenizer, chat_prompt_ids
from tests.executor.test_engine import smollm2

SMALL_CACHE_GB = 1e-3  # 40 chunks of 32 tokens of tiny-llama: room for every test chat


def tiny_server(tiny_model: Callable[[str], LoadedModel], mode: str, **kwargs):
    return create_server(mode, tiny_model("tiny-llama"), gpu_cache_gb=SMALL_CACHE_GB, cpu_cache_gb=SMALL_CACHE_GB,
                         max_new_tokens=6, **kwargs)


def chat(server, turns: list[tuple[str, str]]) -> list[str]:
    return [server.process_request(session, text) for session, text in turns]


TURNS = [("s1", "Hello!"), ("s2", "What is 2 + 2?"), ("s1", "Tell me more."), ("s2", "Why?"), ("s1", "Thanks.")]


def test_stateful_and_stateless_answer_alike_and_account_for_history(
    tiny_model: Callable[[str], LoadedModel],
) -> None:
    pensieve, stateless = tiny_server(tiny_model, "pensieve"), tiny_server(tiny_model, "vllm")
    assert (pensieve.mode, stateless.mode) == ("pensieve", "stateless")
    assert chat(pensieve, TURNS) == chat(stateless, TURNS)

    p, s = pensieve.get_statistics(), stateless.get_statistics()
    for stats in (p, s):
        assert stats["requests"] == 5 and stats["active_sessions"] == 2
        assert stats["history_tokens"] > 0 and stats["mean_prefill_s"] > 0
        assert stats["gpu_hit_rate"] + stats["cpu_hit_rate"] + stats["miss_rate"] == pytest.approx(1.0)
    assert p["tokens_generated"] == s["tokens_generated"] == sum(t.generated_tokens for t in pensieve.turns)
    assert p["gpu_hit_rate"] == 1.0 and s["miss_rate"] == 1.0  # ample cache: everything reused / recomputed
    assert p["device_cache_used_gb"] > 0 and s["device_cache_used_gb"] == 0  # stateless frees each turn
    assert p["host_cache_gb"] == pytest.approx(SMALL_CACHE_GB, rel=0.05) and s["host_cache_gb"] == 0
    text = pensieve.get_statistics_str()
    assert "Inference Mode: Pensieve (Stateful)" in text and "GPU Hit Rate: 100.0%" in text
    assert "Miss Rate: 100.0%" in stateless.get_statistics_str()

    used = p["device_cache_used_gb"]
    pensieve.end_session("s1")
    pensieve.reset_statistics()
    stats = pensieve.get_statistics()
    assert stats["requests"] == 0 and stats["active_sessions"] == 1 and 0 < stats["device_cache_used_gb"] < used
    assert pensieve.engine.conversation_ids("s1") == []


def test_a_session_appends_each_turn_to_its_kept_token_ids(tiny_model: Callable[[str], LoadedModel]) -> None:
    server = tiny_server(tiny_model, "pensieve")
    answers = chat(server, TURNS[:1] + TURNS[2:3])
    ids = server.engine.conversation_ids("s1")
    first, second = server.turns
    tok = ByteTokenizer()
    assert ids[:first.prompt_tokens] == tok.encode("user: Hello!\nassistant: ")
    after = first.prompt_tokens + first.generated_tokens
    assert ids[after:after + second.prompt_tokens] == tok.encode("\nuser: Tell me more.\nassistant: ")
    assert second.history_tokens == after - 1  # the last answer token is not in the KV yet
    assert tok.decode(ids[after + second.prompt_tokens:]) == answers[1]


def test_tiny_caches_swap_and_still_answer_like_stateless(tiny_model: Callable[[str], LoadedModel]) -> None:
    # 14 device chunks of 8 tokens cannot keep two byte-level chats of 12 and 8 chunks: they swap, drop, recompute.
    kwargs = dict(gpu_cache_gb=14 * 6144 / 1e9, cpu_cache_gb=4 * 6144 / 1e9, chunk_tokens=8, stop_at_eos=False)
    loaded = tiny_model("tiny-llama")
    pensieve = create_server("pensieve", loaded, max_new_tokens=4, **kwargs)
    stateless = create_server("stateless", loaded, max_new_tokens=4, **kwargs)
    assert chat(pensieve, TURNS) == chat(stateless, TURNS)
    stats = pensieve.get_statistics()
    assert stats["device_cache_gb"] == pytest.approx(14 * 6144 / 1e9)
    assert stats["swap_out_chunks"] and stats["dropped_chunks"] and stats["miss_rate"] > 0
    assert stats["tokens_generated"] == 4 * len(TURNS)  # EOS ignored: exactly max_new_tokens per turn


def test_modes_defaults_and_bad_arguments(tiny_model: Callable[[str], LoadedModel], no_network) -> None:
    assert default_cache_gb(torch.device("cpu")) == (1.0, 2.0)
    server = create_server("stateless", tiny_model("tiny-llama"))  # defaults: 1 GB device, no host tier
    stats = server.get_statistics()
    assert stats["device_cache_gb"] == pytest.approx(1.0, rel=1e-4) and stats["host_cache_gb"] == 0
    assert server.max_new_tokens == 32 and server.engine.config.temperature == 0.0
    assert server.threads == serving_threads(server.engine.loaded.dims) == 1  # tiny: one thread
    threads = torch.get_num_threads()
    create_server("stateless", tiny_model("tiny-llama"), gpu_cache_gb=SMALL_CACHE_GB, max_new_tokens=2,
                  threads=threads + 1).process_request("s", "Hi")
    assert torch.get_num_threads() == threads  # a server's threads apply only while it serves
    # Argument errors come before any model is loaded (this name would need the network).
    with pytest.raises(ValueError, match="unknown mode 'fast'.*pensieve, stateless, vllm"):
        create_server("fast", "some-org/some-model")
    with pytest.raises(ValueError, match="unknown policy 'fifo'"):
        create_server("pensieve", "some-org/some-model", policy="fifo")
    with pytest.raises(ValueError, match="top_p"):
        create_server("pensieve", "some-org/some-model", top_p=0.0)


def test_smollm2_chat_turns_equal_generate_on_the_templated_history(no_network) -> None:
    loaded = smollm2()
    tok = loaded.tokenizer
    server = create_server("pensieve", loaded, max_new_tokens=12, gpu_cache_gb=0.05, cpu_cache_gb=0.01)
    messages: list[dict[str, str]] = []
    history: list[int] = []
    for text in ["What is the capital of France?", "And of Germany?"]:
        messages.append({"role": "user", "content": text})
        history += chat_prompt_ids(tok, messages, history, frozenset({tok.eos_token_id}))
        assert tok.decode(history) == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        x = torch.tensor([history])
        expected = loaded.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, len(history):]
        answer = server.process_request("chat", text)
        assert server.engine.conversation_ids("chat") == history + expected.tolist()
        assert answer == tok.decode(expected, skip_special_tokens=True)
        history += expected.tolist()
        messages.append({"role": "assistant", "content": answer})
    assert "Berlin" in answer
    assert server.get_statistics()["gpu_hit_rate"] == 1.0
