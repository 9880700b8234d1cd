"""Assemble the cache manager and scheduler that both drivers (executor and simulator) share."""
from __future__ import annotations

from .cache import KVCacheManager
from .config import Scenario
from .cost import CostModel, LinearCostModel
from .policies import policy_class
from .scheduler import Scheduler
from .tiers import slots_for


def build_cost_model(scenario: Scenario, source: str = "<scenario>") -> CostModel:
    """The scenario's profile when it names one (its model must match), else the linear Cost(l)."""
    if scenario.profile:
        from .profile import ProfileCostModel, check_profile_matches, load_profile

        profile = load_profile(scenario.profile)
        check_profile_matches(profile, scenario.model_spec, source)
        return ProfileCostModel(profile)
    cfg = scenario.cost_model
    return LinearCostModel(cfg.a, cfg.c)


def build_scheduler(scenario: Scenario, cost_model: CostModel | None = None) -> Scheduler:
    """The scenario's cache (tiers sized from GB and the model's KV bytes) under its scheduler."""
    spec = scenario.model_spec
    cache_cfg = scenario.cache
    bytes_per_chunk = spec.kv_bytes_per_token * cache_cfg.chunk_tokens
    policy_cls = policy_class(cache_cfg.policy.type)
    try:
        policy = policy_cls(cost_model or build_cost_model(scenario), **cache_cfg.policy.params)
    except TypeError as exc:
        raise ValueError(f"cache.policy.params: {policy_cls.__name__} does not accept them: {exc}") from None
    cache = KVCacheManager(
        device_slots=slots_for(cache_cfg.device_gb, bytes_per_chunk),
        host_slots=slots_for(cache_cfg.host_gb, bytes_per_chunk),
        chunk_tokens=cache_cfg.chunk_tokens,
        policy=policy,
        max_context=spec.max_context,
        bytes_per_chunk=bytes_per_chunk,
        eviction_batch=cache_cfg.eviction_batch,
    )
    s = scenario.scheduler
    return Scheduler(cache, s.max_batch_tokens, s.max_batch_requests, s.decode_reserve,
                     s.swap_out_threshold, spec.max_context)
