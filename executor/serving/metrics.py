"""What `GET /metrics` reports, in Prometheus text: requests, tokens, where history's KV was found,
copies, suspensions, queue lengths, KV use per tier and step times.

Counters are advanced on the engine thread after each step and each finished request; gauges read
the engine when scraped. A registry per server, so that several can live in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics, generate_latest

import torch

from executor.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
disable_created_metrics()  # the *_created series only repeat the start time
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServingMetrics:
    def __init__(self, engine: Engine, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        Info("pensieve", "What this server runs", registry=r).info(
            {"model": model_name, "policy": engine.cache.policy.name, "device": str(engine.loaded.device),
             "chunk_tokens": str(engine.cache.chunk_tokens)})
        self.bytes_per_chunk = engine.bytes_per_chunk
        self.requests = Counter("pensieve_requests", "Requests finished, by how they ended (stop, length, abort)",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("pensieve_prompt_tokens", "Prompt tokens of finished requests, whole "
                                     "prompts as the clients sent them", registry=r)
        self.generation_tokens = Counter("pensieve_generation_tokens", "Tokens generated", registry=r)
        self.history_tokens = Counter(
            "pensieve_history_tokens", "Tokens of kept history at each request's admission, by where their KV "
            "was: device, host, or recomputed (dropped)", ["where"], registry=r)
        self.new_tokens = Counter("pensieve_new_prompt_tokens", "Prompt tokens computed for the first time "
                                  "(beyond the kept history)", registry=r)
        self.departed_tokens = Counter(
            "pensieve_departed_history_tokens", "Kept history tokens discarded because a request departed from "
            "its conversation there (an edited message, a regenerated answer)", registry=r)
        self.swap_bytes = Counter("pensieve_swap_bytes", "KV bytes copied between tiers: in (host to device), "
                                  "out (device to host)", ["direction"], registry=r)
        for where in ("device", "host", "recomputed"):  # every series from the start, at 0
            self.history_tokens.labels(where)
        for direction in ("in", "out"):
            self.swap_bytes.labels(direction)
        self.suspensions = Counter("pensieve_suspensions", "Times a running request was suspended for room",
                                   registry=r)
        self.step_seconds = Histogram("pensieve_step_seconds", "Wall time of one engine step (copies, forward, "
                                      "sampling)", buckets=STEP_BUCKETS, registry=r)
        self.ttft_seconds = Histogram("pensieve_time_to_first_token_seconds", "From a request's arrival to "
                                      "its first token", buckets=TTFT_BUCKETS, registry=r)
        scheduler, cache = engine.scheduler, engine.cache
        Gauge("pensieve_requests_waiting", "Requests queued (new, or suspended)", registry=r).set_function(
            lambda: len(scheduler.waiting))
        Gauge("pensieve_requests_running", "Requests in the running batch", registry=r).set_function(
            lambda: len(scheduler.running))
        used = Gauge("pensieve_kv_cache_used_chunks", "KV chunks held per tier", ["tier"], registry=r)
        capacity = Gauge("pensieve_kv_cache_capacity_chunks", "KV chunks each tier holds", ["tier"], registry=r)
        usage = Gauge("pensieve_kv_cache_usage_ratio", "Share of each tier in use", ["tier"], registry=r)
        for name, pool in (("device", cache.device), ("host", cache.host)):
            used.labels(name).set_function(lambda pool=pool: pool.used)
            capacity.labels(name).set_function(lambda pool=pool: pool.capacity)
            usage.labels(name).set_function(lambda pool=pool: pool.used / pool.capacity if pool.capacity else 0.0)
        Gauge("pensieve_conversations", "Conversations whose token ids are kept", registry=r).set_function(
            lambda: len(cache.conversations))
        Gauge("pensieve_kv_chunk_bytes", "Bytes of one KV chunk", registry=r).set(engine.bytes_per_chunk)
        # OpenMP's thread count belongs to the thread that sets it: the engine thread reports its own.
        self.torch_threads = Gauge("pensieve_torch_threads", "Intra-op threads the engine computes with",
                                   registry=r)
        self.steps_by_threads = Counter("pensieve_steps_by_threads", "Engine steps by the intra-op threads "
                                        "they ran with", ["threads"], registry=r)

    def step_done(self, engine: Engine, plan, swapped_before: tuple[int, int]) -> None:
        """After a step: its time, and the copies it made (the cache's counters against `swapped_before`)."""
        self.step_seconds.observe(engine.last_step_s)
        threads = torch.get_num_threads()  # on the engine thread
        self.torch_threads.set(threads)
        self.steps_by_threads.labels(str(threads)).inc()
        stats = engine.cache.stats
        swapped_in, swapped_out = stats.swap_in_chunks - swapped_before[0], stats.swap_out_chunks - swapped_before[1]
        if swapped_in:
            self.swap_bytes.labels("in").inc(swapped_in * self.bytes_per_chunk)
        if swapped_out:
            self.swap_bytes.labels("out").inc(swapped_out * self.bytes_per_chunk)

    def request_done(self, request, finish_reason: str, prompt_tokens: int) -> None:
        self.requests.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(request.generated)
        self.history_tokens.labels("device").inc(request.gpu_hit_tokens)
        self.history_tokens.labels("host").inc(request.cpu_hit_tokens)
        self.history_tokens.labels("recomputed").inc(request.recomputed_tokens)
        self.new_tokens.inc(request.new_prompt_tokens)
        self.suspensions.inc(request.suspensions)
        if request.first_token is not None:
            self.ttft_seconds.observe(max(0.0, request.first_token - request.arrival))

    def render(self) -> bytes:
        return generate_latest(self.registry)
