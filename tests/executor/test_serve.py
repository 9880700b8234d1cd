"""`pensieve serve` driven by the official `openai` client over 127.0.0.1, on a tiny random Llama.

Every answer is checked against stateless recompute of the same tokens: reuse over HTTP (by
session id or by prefix alone, under swaps, drops and suspensions, with clients arriving at once,
leaving mid-stream or sending an edited history) never changes a greedy token.
"""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from executor.engine import EngineConfig
from tests.executor.serving import live_server, stateless_answer

PROMPT = list(range(300, 370))  # 70 ids: two whole 32-token chunks and a part


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("tiny-llama")


@pytest.fixture(scope="module")
def server(llama):
    with live_server(llama, EngineConfig(device_slots=64, host_slots=64), max_tokens=16) as live:
        yield live


def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


def complete(live, prompt: list[int], max_tokens: int = 8, session: str | None = None, **extra):
    """A greedy text completion of token ids; the response with its token ids."""
    headers = {"X-Session-ID": session} if session else None
    return client(live).completions.create(
        model=live.model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_headers=headers,
        extra_body={"return_token_ids": True, "ignore_eos": True, **extra})


def test_chat_and_completions_streamed_and_not_through_the_official_client(server) -> None:
    c = client(server)
    messages = [{"role": "user", "content": "Tell me about the tides. " * 4}]
    whole = c.chat.completions.create(model=server.model, messages=messages, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
    chunks = list(c.chat.completions.create(model=server.model, messages=messages + [
        {"role": "assistant", "content": whole.choices[0].message.content}, {"role": "user", "content": "More."}],
        max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens > whole.usage.prompt_tokens
    text = c.completions.create(model=server.model, prompt="Once upon a time", max_tokens=5, temperature=0,
                                extra_body={"ignore_eos": True})
    assert text.object == "text_completion" and text.usage.completion_tokens == 5
    streamed = list(c.completions.create(model=server.model, prompt="Once upon a time", max_tokens=5, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == text.choices[0].text  # greedy: the same
    assert [m.id for m in c.models.list().data] == [server.model]


@pytest.mark.parametrize("session", ["s-1", None], ids=["session-id", "prefix-alone"])
def test_second_turn_finds_the_first_turns_kv_on_the_device(server, llama, session) -> None:
    first = complete(server, PROMPT, session=session)
    answer = first.choices[0].token_ids
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    follow = PROMPT + answer + list(range(400, 420))
    second = complete(server, follow, session=session)
    # every token of the first turn but the answer's last (which no step has computed yet) is reused
    assert second.usage.prompt_tokens_details.cached_tokens == len(PROMPT) + len(answer) - 1
    assert second.usage.model_extra["pensieve"]["device_hit_tokens"] == len(PROMPT) + len(answer) - 1
    assert second.choices[0].token_ids == stateless_answer(llama, follow, 8)


def test_chat_by_prefix_alone_reuses_history_across_turns(server, llama) -> None:
    c = client(server)
    messages = [{"role": "user", "content": "Plan a walk by the river for this afternoon, please. " * 3}]
    first = c.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And tomorrow?"}]
    second = c.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    # The answer's text re-tokenizes differently from the ids sampled (random weights), so reuse stops
    # where they part; the first prompt is reused whole.
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    prompt = second.model_extra["prompt_token_ids"]
    assert second.choices[0].model_extra["token_ids"] == stateless_answer(llama, prompt, 8)


def test_an_edited_history_reuses_the_common_prefix_only(server, llama) -> None:
    first = complete(server, PROMPT, session="edit")
    answer = first.choices[0].token_ids
    edited = PROMPT[:40] + [499] * 30 + answer + [450, 451]  # an earlier message changed mid-way
    departed = server.metric("pensieve_departed_history_tokens_total")
    second = complete(server, edited, session="edit")
    assert second.usage.prompt_tokens_details.cached_tokens == 40
    assert second.choices[0].token_ids == stateless_answer(llama, edited, 8)
    assert server.metric("pensieve_departed_history_tokens_total") == departed + len(PROMPT) + len(answer) - 40
    # the same request again: its whole history is there now
    again = complete(server, edited, session="edit")
    assert again.choices[0].token_ids == second.choices[0].token_ids
    assert again.usage.prompt_tokens_details.cached_tokens == len(edited) - 1
    server.check_invariants()


def test_concurrent_clients_under_cache_pressure_each_get_the_stateless_answer(llama) -> None:
    """Eight conversations of three turns at once on a device tier that holds about three of them."""
    config = EngineConfig(device_slots=12, host_slots=6, chunk_tokens=32)
    results: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    errors: list[BaseException] = []
    with live_server(llama, config) as live:
        def converse(c: int) -> None:
            try:
                history: list[int] = []
                for turn in range(3):
                    prompt = history + [300 + 7 * c + turn] * 20
                    reply = complete(live, prompt, max_tokens=10, session=None if c % 2 else f"conv-{c}")
                    results[c, turn] = prompt, reply.choices[0].token_ids
                    history = prompt + reply.choices[0].token_ids
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=converse, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        live.check_invariants()
        swapped = live.metric('pensieve_swap_bytes_total{direction="out"}')
        recomputed = live.metric('pensieve_history_tokens_total{where="recomputed"}')
    assert len(results) == 24
    for prompt, answer in results.values():
        assert answer == stateless_answer(llama, prompt, 10)
    assert swapped > 0 and recomputed > 0  # the tiers were too small: it swapped and dropped


def test_a_client_leaving_mid_stream_is_cancelled_and_its_history_kept(server, llama) -> None:
    aborted = server.metric('pensieve_requests_total{finish_reason="abort"}')
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    received: list[str] = []
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body,
                         headers={"X-Session-ID": "leaver"}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:"):
                    received.append(line)
                if len(received) == 3:
                    break  # leave: the connection closes with the block
    deadline = threading.Event()
    for _ in range(100):
        if server.metric('pensieve_requests_total{finish_reason="abort"}') == aborted + 1:
            break
        deadline.wait(0.1)
    assert server.metric('pensieve_requests_total{finish_reason="abort"}') == aborted + 1
    server.check_invariants()
    # What it generated before leaving is its conversation's history: the next turn continues it.
    follow = complete(server, PROMPT + [451, 452], session="leaver")
    assert follow.usage.prompt_tokens_details.cached_tokens == len(PROMPT)
    assert follow.choices[0].token_ids == stateless_answer(llama, PROMPT + [451, 452], 8)


def _post(live, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{live.url}{path}", content=body if isinstance(body, (bytes, str)) else None,
                      json=None if isinstance(body, (bytes, str)) else body, timeout=60, **kwargs)


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    ({"model": "gpt-4", "prompt": [5, 6]}, 404, "model", "model_not_found"),
    ({"prompt": [5, 6]}, 400, "model", "missing_required_parameter"),
    ({"model": "M", "prompt": [5] * 1020, "max_tokens": 10}, 400, "prompt", "context_length_exceeded"),
    ({"model": "M", "prompt": [5, 6], "max_tokens": -3}, 400, "max_tokens", "invalid_value"),
    ({"model": "M", "prompt": [5, 6], "logit_bias": {"5": 1}}, 400, "logit_bias", "unsupported_parameter"),
    ({"model": "M", "prompt": [5, 6], "n": 2}, 400, "n", "unsupported_value"),
    ({"model": "M", "prompt": [5, 99999]}, 400, "prompt", "invalid_value"),
    ({"model": "M", "prompt": [5, 6], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
], ids=["malformed-json", "unknown-model", "no-model", "over-context", "negative-max-tokens", "unsupported-param",
        "n-above-1", "token-out-of-vocab", "five-stops"])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, body, status, param, code) -> None:
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": server.model}
    response = _post(server, "/v1/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code) and error["message"]
    assert complete(server, [7, 8, 9], max_tokens=2).usage.completion_tokens == 2


def test_a_turn_the_device_tier_cannot_hold_is_refused_with_400(llama) -> None:
    with live_server(llama, EngineConfig(device_slots=2, host_slots=0, chunk_tokens=32)) as live:
        response = _post(live, "/v1/completions", {"model": live.model, "prompt": list(range(10, 110)),
                                                   "max_tokens": 4})
        assert response.status_code == 400 and "device tier" in response.json()["error"]["message"]
        assert complete(live, [7, 8, 9], max_tokens=2).usage.completion_tokens == 2


def test_stop_strings_end_the_text_before_them(server) -> None:
    plain = client(server).completions.create(model=server.model, prompt="abcdef", max_tokens=12, temperature=0,
                                              extra_body={"ignore_eos": True})
    text = plain.choices[0].text
    stop = text[4:6]
    cut = client(server).completions.create(model=server.model, prompt="abcdef", max_tokens=12, temperature=0,
                                            stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text


def test_a_seeded_request_samples_the_same_tokens_whatever_runs_beside_it(server) -> None:
    def sampled() -> list[int]:
        return client(server).completions.create(
            model=server.model, prompt=[11, 12, 13, 14], max_tokens=10, temperature=1.0, seed=7,
            extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0].model_extra["token_ids"]

    alone = sampled()
    beside = threading.Thread(target=complete, args=(server, PROMPT, 30))
    beside.start()
    together = sampled()
    beside.join()
    assert alone == together


def test_health_and_metrics_in_prometheus_text(server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    complete(server, [20, 21, 22], max_tokens=3)
    page = httpx.get(f"{server.url}/metrics").text
    for name in ("pensieve_requests_total", "pensieve_prompt_tokens_total", "pensieve_generation_tokens_total",
                 'pensieve_history_tokens_total{where="device"}', 'pensieve_swap_bytes_total{direction="in"}',
                 "pensieve_suspensions_total", "pensieve_requests_waiting", 'pensieve_kv_cache_usage_ratio{tier="host"}',
                 "pensieve_step_seconds_bucket", "pensieve_time_to_first_token_seconds_count", "pensieve_info{"):
        assert name in page, name
    assert server.metric("pensieve_generation_tokens_total") >= 3


def test_greedy_requests_on_a_sampling_server_take_the_row_path_and_equal_stateless(llama) -> None:
    """A server whose default is to sample: a request asking for temperature 0 is sampled row by row
    with its own settings (the batched path serves only requests with the engine's own), and must
    still give the greedy tokens."""
    with live_server(llama, EngineConfig(device_slots=64, host_slots=64, temperature=0.8)) as live:
        replies = {}

        def ask(c: int) -> None:
            replies[c] = complete(live, [40 + c] * 30, max_tokens=6).choices[0].token_ids

        threads = [threading.Thread(target=ask, args=(c,)) for c in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    for c, answer in replies.items():
        assert answer == stateless_answer(llama, [40 + c] * 30, 6)
