"""The first prototype's Python API, done for real: `create_server(...)`, `process_request`, statistics.

A server holds chat sessions on one engine. Each call serves one user turn to completion; the
session's token ids stay in the engine between calls, so a stateful server reuses their KV.
"""

from __future__ import annotations

import os
import time
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from executor.cpu import serving_threads, torch_threads
from executor.engine import Engine, EngineConfig
from executor.models import default_device, LoadedModel, load_model
from executor.tokenizer import chat_prompt_ids, text_tokenizer
from pensieve.policies import policy_class

MODES = {"pensieve": "pensieve", "stateless": "stateless", "vllm": "stateless"}  # vllm: the prototype's name
CUDA_CACHE_GB = (40.0, 100.0)  # device, host: the first prototype's defaults
CPU_CACHE_GB = (1.0, 2.0)


@dataclass(frozen=True)
class TurnStats:
    """One served turn: where its history's KV was found and how long its first token took."""

    session_id: Hashable
    turn: int
    prompt_tokens: int
    history_tokens: int
    gpu_hit_tokens: int
    cpu_hit_tokens: int
    recomputed_tokens: int
    generated_tokens: int
    prefill_s: float  # the step that produced the first token
    latency_s: float  # the whole turn


def default_cache_gb(device: torch.device) -> tuple[float, float]:
    """40 GB device / 100 GB host on CUDA, capped to what is free there; 1 GB / 2 GB on CPU."""
    if device.type != "cuda":
        return CPU_CACHE_GB
    free_device, _ = torch.cuda.mem_get_info(device)
    free_host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # Headroom: activations of a full batch on the device, everything else on the host.
    return min(CUDA_CACHE_GB[0], 0.8 * free_device / 1e9), min(CUDA_CACHE_GB[1], 0.5 * free_host / 1e9)


class PensieveServer:
    """Chat sessions served by an engine: stateful (`pensieve`) or recomputing every turn (`stateless`)."""

    def __init__(self, engine: Engine, mode: str, tokenizer, max_new_tokens: int = 32, stop_at_eos: bool = True,
                 threads: int | None = None) -> None:
        self.engine = engine
        self.mode = mode
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.stop_at_eos = stop_at_eos
        self.threads = threads
        self.turns: list[TurnStats] = []
        self._messages: dict[Hashable, list[dict[str, str]]] = {}  # per session, for the chat template
        self._cache_stats_base = self._cache_counts()

    def process_request(self, session_id: Hashable, text: str) -> str:
        """Serve one user message of a session; returns the assistant's answer (EOS or max_new_tokens ends it)."""
        engine = self.engine
        messages = [*self._messages.get(session_id, []), {"role": "user", "content": text}]
        prompt = chat_prompt_ids(self.tokenizer, messages, engine.conversation_ids(session_id), engine.eos_token_ids)
        start = time.perf_counter()
        with torch_threads(self.threads):
            request = engine.add_request(session_id, prompt, self.max_new_tokens, start, stop_at_eos=self.stop_at_eos)
            engine.run_until_idle()
        answer_ids = engine.generated_ids(request.id)
        answer = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
        self._messages[session_id] = [*messages, {"role": "assistant", "content": answer}]
        self.turns.append(TurnStats(
            session_id, request.turn, request.prompt_tokens, request.history_tokens, request.gpu_hit_tokens,
            request.cpu_hit_tokens, request.recomputed_tokens, len(answer_ids), engine.prefill_s[request.id],
            time.perf_counter() - start,
        ))
        return answer

    def end_session(self, session_id: Hashable) -> None:
        """Forget a session: its history and its KV cache."""
        self.engine.end_conversation(session_id)
        self._messages.pop(session_id, None)

    def reset_statistics(self) -> None:
        """Forget served turns and cache counters (e.g. after a warm-up); sessions and their KV stay."""
        self.turns = []
        self._cache_stats_base = self._cache_counts()

    def _cache_counts(self) -> dict[str, int]:
        stats = self.engine.cache.stats
        return {"swap_in_chunks": stats.swap_in_chunks, "swap_out_chunks": stats.swap_out_chunks,
                "dropped_chunks": stats.dropped_chunks}

    def get_statistics(self) -> dict:
        """Counts since start (or the last reset); hit rates are over history tokens, memory is now."""
        engine, cache, turns = self.engine, self.engine.cache, self.turns
        history = sum(t.history_tokens for t in turns)

        def share(tokens: int) -> float:
            return tokens / history if history else 0.0

        gb = engine.bytes_per_chunk / 1e9
        return {
            "mode": self.mode,
            "policy": engine.config.policy,
            "model": engine.loaded.name,
            "device": str(engine.loaded.device),
            "requests": len(turns),
            "tokens_generated": sum(t.generated_tokens for t in turns),
            "mean_prefill_s": sum(t.prefill_s for t in turns) / len(turns) if turns else 0.0,
            "history_tokens": history,
            "gpu_hit_rate": share(sum(t.gpu_hit_tokens for t in turns)),
            "cpu_hit_rate": share(sum(t.cpu_hit_tokens for t in turns)),
            "miss_rate": share(sum(t.recomputed_tokens for t in turns)),
            "active_sessions": len(self._messages),
            "device_cache_used_gb": cache.device.used * gb,
            "device_cache_gb": cache.device.capacity * gb,
            "host_cache_used_gb": cache.host.used * gb,
            "host_cache_gb": cache.host.capacity * gb,
            **{k: v - self._cache_stats_base[k] for k, v in self._cache_counts().items()},
        }

    def get_statistics_str(self) -> str:
        """A printable summary, in the first prototype's layout."""
        s = self.get_statistics()
        mode = "Pensieve (Stateful)" if s["mode"] == "pensieve" else "Stateless (vLLM baseline)"
        return "\n".join([
            "=== Pensieve Server Statistics ===",
            f"Inference Mode: {mode}, policy {s['policy']}",
            f"Model: {s['model']} on {s['device']}",
            f"Total Requests: {s['requests']}",
            f"Tokens Generated: {s['tokens_generated']}",
            f"Mean Prefill Time: {s['mean_prefill_s'] * 1e3:.1f} ms",
            f"Active Sessions: {s['active_sessions']}",
            "",
            "Cache Statistics:",
            f"GPU: {s['device_cache_used_gb']:.3f}/{s['device_cache_gb']:.3f} GB | "
            f"CPU: {s['host_cache_used_gb']:.3f}/{s['host_cache_gb']:.3f} GB",
            f"GPU Hit Rate: {s['gpu_hit_rate']:.1%}",
            f"CPU Hit Rate: {s['cpu_hit_rate']:.1%}",
            f"Miss Rate: {s['miss_rate']:.1%}",
            f"Chunks Swapped Out / In / Dropped: "
            f"{s['swap_out_chunks']} / {s['swap_in_chunks']} / {s['dropped_chunks']}",
        ])


def create_server(
    mode: str = "pensieve",
    model: str | LoadedModel | None = None,
    gpu_cache_gb: float | None = None,
    cpu_cache_gb: float | None = None,
    device: str | None = None,
    max_new_tokens: int = 32,
    policy: str = "pensieve",
    dtype: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    *,
    chunk_tokens: int = 32,
    stop_at_eos: bool = True,
    seed: int = 0,
    threads: int | None = None,
) -> PensieveServer:
    """A chat server on `model` (None: the built-in SmolLM2; a LoadedModel is used as is, ignoring device and dtype).

    `mode`: pensieve (stateful, eviction `policy`), stateless or vllm (recompute every turn). Caches
    default to 40 GB / 100 GB on CUDA (capped to what is free) and 1 GB / 2 GB on CPU. `threads`:
    torch threads while serving (default on CPU: `executor.cpu.serving_threads`; on CUDA: unchanged).
    `stop_at_eos=False` generates exactly `max_new_tokens` per turn, as comparisons need.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    policy = "stateless" if MODES[mode] == "stateless" else policy
    policy_class(policy)  # an unknown policy fails before the model loads
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1, got "
                         f"{max_new_tokens}, {temperature} and {top_p}")
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        loaded = load_model(model, device or default_device(), dtype)
    default_device_gb, default_host_gb = default_cache_gb(loaded.device)
    config = EngineConfig(
        policy=policy,
        device_cache_gb=default_device_gb if gpu_cache_gb is None else gpu_cache_gb,
        host_cache_gb=default_host_gb if cpu_cache_gb is None else cpu_cache_gb,
        chunk_tokens=chunk_tokens, temperature=temperature, top_p=top_p, seed=seed,
    )
    tokenizer = text_tokenizer(loaded)  # random weights: bytes in, bytes out
    if threads is None and loaded.device.type == "cpu":
        threads = serving_threads(loaded.dims)
    return PensieveServer(Engine(loaded, config), MODES[mode], tokenizer, max_new_tokens, stop_at_eos, threads)
