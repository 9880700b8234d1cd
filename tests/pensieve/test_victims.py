"""Exact victim selection: the stale-entry case, the indexes against the exact scan, the contract."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pensieve.cache import KVCacheManager
from pensieve.cost import LinearCostModel
from pensieve.policies import REGISTRY, PensievePolicy, PolicyContractError, make_policy
from pensieve.victims import RecencyIndex, RetentionIndex, ScanIndex

from .helpers import USER_POLICY, Driver, check_every_victim, make_core
from .test_properties import run_random_workload, turns


def serve_turn(cache: KVCacheManager, conv_id, tokens: int, start: float, end: float):
    """A turn through the cache alone: `tokens` more tokens admitted at `start`, computed, released at `end`."""
    conv = cache.conversation(conv_id, start)
    conv.tokens += tokens
    assert cache.acquire(conv, start) is not None
    conv.kv_tokens = conv.tokens
    cache.release(conv, end)
    return conv


def test_a_conversation_restored_and_released_again_is_not_evicted_at_its_old_place():
    """The issue's case: 16 slots, pensieve-gpu, a cost flat in context. B idles at t=0, A at t=1; C
    (9 chunks) forces one eviction at t=2; A is restored at 3 and released at 4; C is released at
    3.5; at t=5 a new conversation needs 6 slots. Exact order takes B's chunks, then C's (idle
    longer than A); a victim entry left from the t=2 pass took three of A's."""
    cache = KVCacheManager(16, 0, 1, make_policy("pensieve-gpu", LinearCostModel(0.0, 1.0)), max_context=64)
    b = serve_turn(cache, "B", 4, 0.0, 0.0)
    a = serve_turn(cache, "A", 4, 1.0, 1.0)
    c = cache.conversation("C", 2.0)
    c.tokens = 9
    assert cache.acquire(c, 2.0) is not None
    c.kv_tokens = 9
    assert (b.drop_end, a.drop_end) == (1, 0)  # B, idle longest, gave its leading chunk
    assert cache.acquire(a, 3.0) is not None  # all of A is still on the device
    cache.release(c, 3.5)
    cache.release(a, 4.0)
    d = cache.conversation("D", 5.0)
    d.tokens = 6
    assert cache.acquire(d, 5.0) is not None
    assert (b.drop_end, c.drop_end, a.drop_end) == (4, 3, 0)
    cache.check_invariants()


@pytest.mark.parametrize("policy", ["pensieve", "lru"])
def test_reclaims_follow_retention_order_not_copy_order(policy):
    """Two idle conversations copied out ahead of time, the older one copied last: reclaiming takes
    the older one's slots first (retention order), not the first copied."""
    cache = KVCacheManager(8, 8, 1, make_policy(policy, LinearCostModel(0.0, 1.0)), max_context=64)
    old = serve_turn(cache, "old", 2, 0.0, 0.0)
    young = serve_turn(cache, "young", 2, 1.0, 5.0)
    for conv in (young, old):  # copy the younger first
        cache._copy_to_host(conv, 2)
        cache.clean_count += 2
    new = cache.conversation("new", 6.0)
    new.tokens = 6  # 4 free slots, then 2 reclaims
    assert cache.acquire(new, 6.0) is not None
    assert (old.host_end, young.host_end) == (2, 0)
    cache.check_invariants()


POLICIES = ["pensieve", "pensieve-gpu", "lru", "trailing-lru", "conversation-lru"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(POLICIES),
    device=st.integers(10, 40),
    host=st.integers(0, 30),
    threshold=st.sampled_from([0.0, 0.5]),
    conversations=st.lists(turns, min_size=1, max_size=6),
    gaps=st.lists(st.integers(0, 30), min_size=30, max_size=30),
)
def test_fast_indexes_make_the_plans_the_exact_scan_makes(policy, device, host, threshold, conversations, gaps):
    """A policy's own index and ScanIndex (every head scored at every eviction) give the same plans
    and the same layouts, step by step."""
    plans = []
    layouts = []
    for index in (None, ScanIndex):
        d = Driver(make_core(policy, device, host, threshold=threshold, max_batch_requests=4, victim_index=index))
        plans.append(run_random_workload(d, conversations, gaps))
        layouts.append({cid: (c.drop_end, c.host_end, c.copy_end, c.chunks)
                        for cid, c in d.sched.cache.conversations.items()})
    assert [p.swap_out for p in plans[0]] == [p.swap_out for p in plans[1]]
    assert plans[0] == plans[1]
    assert layouts[0] == layouts[1]


def test_many_idle_conversations_evict_exactly_under_pressure():
    """Dozens of idle conversations of different ages and lengths, a tier too small for them: every
    victim every index answers is checked against a brute-force sort."""
    import random

    for policy in ["pensieve", "lru", "trailing-lru", USER_POLICY]:
        d = Driver(make_core(policy, 120, 60, threshold=0.25, max_batch_requests=8))
        checked = check_every_victim(d.sched.cache)
        rng = random.Random(7)
        conversations = [[(rng.randint(1, 30), rng.randint(1, 10)) for _ in range(3)] for _ in range(40)]
        gaps = [rng.randint(0, 40) for _ in range(30)]
        run_random_workload(d, conversations, gaps)
        assert checked.answers > 50 and checked.victims > 200, (policy, checked.answers, checked.victims)


@pytest.mark.parametrize("policy, index", [("pensieve", RetentionIndex), ("pensieve-gpu", RetentionIndex),
                                           ("lru", RecencyIndex), ("trailing-lru", RecencyIndex),
                                           ("conversation-lru", RecencyIndex), ("stateless", RecencyIndex),
                                           (USER_POLICY, ScanIndex)])
def test_each_policy_gets_the_index_its_score_allows(policy, index):
    cache = make_core(policy, 8, 8).cache
    assert type(cache.device_victims) is type(cache.clean_victims) is type(cache.host_victims) is index
    assert type(make_core(policy, 8, 8, victim_index=ScanIndex).cache.host_victims) is ScanIndex


def test_a_policy_whose_scores_fall_along_its_eviction_order_is_refused():
    class TrailingPensieve(PensievePolicy):
        name = "trailing-pensieve"
        order = "trailing"  # evicts the latest chunks first, but they cost the most to recompute

    with pytest.raises(PolicyContractError, match="'trailing-pensieve'.*breaks the eviction contract"):
        KVCacheManager(8, 8, 4, TrailingPensieve(LinearCostModel(1.0, 1.0)), max_context=64)


def test_a_policy_that_misdeclares_its_index_is_refused():
    class Freshest(PensievePolicy):
        name = "freshest"

        def score(self, chunk_index, idle_s):  # rises with idle time: not a retention score
            return self.chunk_cost(chunk_index) * idle_s

    with pytest.raises(PolicyContractError, match="'freshest' declares victim_index 'retention'"):
        KVCacheManager(8, 8, 4, Freshest(LinearCostModel(1.0, 1.0)), max_context=64)
    Freshest.victim_index = "scan"
    KVCacheManager(8, 8, 4, Freshest(LinearCostModel(1.0, 1.0)), max_context=64)  # exact scan accepts it


def test_every_registered_policy_keeps_the_contract():
    for name in REGISTRY:
        make_policy(name, LinearCostModel(2e-7, 1e-3)).bind(32, 512)  # raises if not


def test_a_whole_conversation_policy_must_score_its_chunks_alike():
    class WholePensieve(PensievePolicy):
        name = "whole-pensieve"
        unit = "conversation"

    with pytest.raises(PolicyContractError, match="'whole-pensieve' moves whole conversations"):
        KVCacheManager(8, 8, 4, WholePensieve(LinearCostModel(1.0, 1.0)), max_context=64)


def test_an_index_that_is_not_exact_for_the_policy_is_refused():
    with pytest.raises(PolicyContractError, match="RecencyIndex is not exact for policy 'pensieve'"):
        make_core("pensieve", 8, 8, victim_index=RecencyIndex)
    with pytest.raises(PolicyContractError, match="RetentionIndex is not exact"):
        make_core(USER_POLICY, 8, 8, victim_index=RetentionIndex)
    make_core("lru", 8, 8, victim_index=RetentionIndex)  # a recency score is a retention score too
