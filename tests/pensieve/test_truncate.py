"""Truncating an idle conversation (its client edited or regenerated a later message): the KV past the
kept tokens is freed on both tiers, the rest keeps its place, and the next turn recomputes exactly
what is no longer kept."""
import pytest

from pensieve.policies import REGISTRY, policy_class

from .helpers import Driver, make_core

KEEPING = [name for name in REGISTRY if policy_class(name).retains_history]


def mixed_layout(policy: str) -> Driver:
    """Conversation A idle with chunks dropped, on the host, on both tiers and on the device only
    (as far as the policy makes them)."""
    d = Driver(make_core(policy, 10, 4, threshold=0.3))
    d.add("A", 0, 0.0, 29, 3)  # 32 tokens, 31 of them computed: 8 chunks of 4
    d.run(0.0)
    d.add("B", 0, 1.0, 17, 2)
    d.run(1.0)
    d.add("C", 0, 2.0, 9, 2)
    d.run(2.0)
    return d


@pytest.mark.parametrize("policy", KEEPING)
@pytest.mark.parametrize("keep", [0, 1, 8, 9, 17, 31, 32])
def test_truncation_frees_the_chunks_past_the_kept_tokens_and_the_next_turn_recomputes_the_rest(policy, keep):
    d = mixed_layout(policy)
    cache = d.sched.cache
    a = cache.conversations["A"]
    used = cache.device.used + cache.host.used
    before = [(a.dev[i], a.host[i]) for i in range(a.chunks)]
    assert a.kv_tokens == 31 and sum(dev < 0 for dev, _ in before) > 0  # some of it is off the device
    kept = cache.truncate("A", keep)
    cache.check_invariants()
    assert kept == min(keep, 31) and a.tokens == keep and a.kv_tokens == kept
    chunks = -(-kept // 4)
    assert a.chunks == chunks
    assert [(a.dev[i], a.host[i]) for i in range(chunks)] == before[:chunks]  # the kept ones stay put
    freed = sum((dev >= 0) + (host >= 0) for dev, host in before[chunks:])
    assert cache.device.used + cache.host.used == used - freed
    request = d.add("A", 1, 3.0, 6, 2)
    d.run(3.0)
    cache.check_invariants()
    assert request.done and request.history_tokens == kept
    assert request.gpu_hit_tokens + request.cpu_hit_tokens + request.recomputed_tokens == kept
    assert request.new_prompt_tokens == keep - kept + 6


def test_only_an_idle_conversation_within_its_tokens_can_be_truncated():
    d = Driver(make_core("pensieve", 10, 4))
    d.add("A", 0, 0.0, 9, 3)
    d.step(0.0)
    cache = d.sched.cache
    with pytest.raises(ValueError, match="in flight"):
        cache.truncate("A", 4)
    d.run(0.0)
    with pytest.raises(ValueError, match="cannot keep 40"):
        cache.truncate("A", 40)
    assert cache.truncate("nobody", 0) == 0
