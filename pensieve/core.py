"""Assemble the core (cache manager and scheduler) that every driver shares: the simulator, the
real engine, `bench-core` and the tests all build it here, so that the same settings give the
same eviction everywhere."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .cache import KVCacheManager
from .config import Scenario, SchedulerConfig
from .cost import CostModel, LinearCostModel
from .policies import policy_class
from .scheduler import Scheduler
from .tiers import slots_for
from .victims import VictimIndex


def rng_for(scenario: Scenario) -> np.random.Generator:
    """One seeded generator per scenario, so the same scenario draws the same workload in every driver."""
    return np.random.default_rng(scenario.seed)


def build_cost_model(scenario: Scenario, source: str = "<scenario>") -> CostModel:
    """The scenario's profile when it names one (its model must match), else the linear Cost(l)."""
    if scenario.profile:
        from .profile import ProfileCostModel, check_profile_matches, load_profile

        profile = load_profile(scenario.profile)
        check_profile_matches(profile, scenario.model_spec, source, scenario.tensor_parallel)
        return ProfileCostModel(profile)
    cfg = scenario.cost_model
    return LinearCostModel(cfg.a, cfg.c)


def build_core(*, policy: str, cost_model: CostModel, device_slots: int, host_slots: int, chunk_tokens: int,
               max_context: int, scheduler: SchedulerConfig = SchedulerConfig(),
               policy_params: Mapping | None = None, bytes_per_chunk: int = 0,
               victim_index: type[VictimIndex] | None = None) -> Scheduler:
    """The core: a policy (by name or import path, with its params) pricing Cost(l) with
    `cost_model`, a cache of the given tiers, and the scheduler's settings."""
    policy_cls = policy_class(policy)
    try:
        instance = policy_cls(cost_model, **dict(policy_params or {}))
    except TypeError as exc:
        raise ValueError(f"cache.policy.params: {policy_cls.__name__} does not accept them: {exc}") from None
    except ValueError as exc:  # a param of the right name with a value the policy refuses
        raise ValueError(f"cache.policy.params ({policy_cls.name}): {exc}") from None
    cache = KVCacheManager(device_slots, host_slots, chunk_tokens, instance, max_context,
                           bytes_per_chunk=bytes_per_chunk, swap_out_batch=scheduler.swap_out_batch,
                           victim_index=victim_index)
    return Scheduler(cache, scheduler.max_batch_tokens, scheduler.max_batch_requests, scheduler.decode_reserve,
                     scheduler.swap_out_threshold, max_context, scheduler.batching, scheduler.queue_aware)


def build_scheduler(scenario: Scenario, cost_model: CostModel | None = None, policy: str | None = None) -> Scheduler:
    """The scenario's core: tiers sized from GB and the model's KV bytes. `policy` overrides the
    scenario's (and then its params, which belong to the scenario's policy, are left out)."""
    spec = scenario.gpu_spec  # each GPU's tiers hold its share of every token's KV
    cache = scenario.cache
    bytes_per_chunk = spec.kv_bytes_per_token * cache.chunk_tokens
    return build_core(
        policy=policy or cache.policy.type, policy_params=policy_params(scenario, policy),
        cost_model=cost_model or build_cost_model(scenario),
        device_slots=slots_for(cache.device_gb, bytes_per_chunk), host_slots=slots_for(cache.host_gb, bytes_per_chunk),
        chunk_tokens=cache.chunk_tokens, max_context=spec.max_context, scheduler=scenario.scheduler,
        bytes_per_chunk=bytes_per_chunk,
    )


def policy_params(scenario: Scenario, policy: str | None = None) -> dict:
    """The scenario's `cache.policy.params`, unless `policy` names another policy."""
    if policy is not None and policy != scenario.cache.policy.type:
        return {}
    return dict(scenario.cache.policy.params)


def core_settings(sched: Scheduler) -> dict:
    """Everything a core's eviction and scheduling depend on, read back from a built core: two
    drivers built from one scenario must agree on all of it (tests)."""
    cache, policy = sched.cache, sched.cache.policy
    own = {k: v for k, v in vars(policy).items() if not k.startswith("_") and k != "cost_model"}
    return {
        "policy": f"{type(policy).__module__}.{type(policy).__qualname__}", "policy_attributes": own,
        "chunk_costs": [policy.chunk_cost(i) for i in range(cache.max_chunks + 1)],
        "victim_index": type(cache.device_victims).__name__, "device_slots": cache.device.capacity,
        "host_slots": cache.host.capacity, "chunk_tokens": cache.chunk_tokens, "max_chunks": cache.max_chunks,
        "bytes_per_chunk": cache.bytes_per_chunk, "swap_out_batch": cache.swap_out_batch,
        "max_batch_tokens": sched.max_batch_tokens, "max_batch_requests": sched.max_batch_requests,
        "decode_reserve": sched.decode_reserve, "swap_out_threshold": sched.swap_out_threshold,
        "max_context": sched.max_context,
    }
