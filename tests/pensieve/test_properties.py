"""Invariants of the cache and scheduler under random conversations, turns and capacities."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pensieve.policies import REGISTRY

from .helpers import Driver, make_core

turns = st.lists(st.tuples(st.integers(1, 20), st.integers(1, 12)), min_size=1, max_size=4)


@settings(max_examples=90, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(sorted(REGISTRY)),
    device=st.integers(10, 40),
    host=st.integers(0, 30),
    threshold=st.sampled_from([0.0, 0.25, 0.5]),
    reserve=st.sampled_from([0.0, 0.1]),
    batch_tokens=st.sampled_from([8, 32, 256]),
    conversations=st.lists(turns, min_size=1, max_size=6),
    gaps=st.lists(st.integers(0, 30), min_size=30, max_size=30),
    victims_per_pass=st.sampled_from([1, 3, 8]),
    numpy_selection=st.booleans(),
)
def test_random_workloads_keep_every_invariant_and_finish(policy, device, host, threshold, reserve, batch_tokens,
                                                          conversations, gaps, victims_per_pass, numpy_selection):
    import pensieve.cache

    few = pensieve.cache.FEW_CANDIDATES
    # these tiers hold a handful of conversations: force the numpy selection path half the time
    pensieve.cache.FEW_CANDIDATES = -1 if numpy_selection else few
    try:
        _random_workload(policy, device, host, threshold, reserve, batch_tokens, conversations, gaps,
                         victims_per_pass)
    finally:
        pensieve.cache.FEW_CANDIDATES = few


def _random_workload(policy, device, host, threshold, reserve, batch_tokens, conversations, gaps, victims_per_pass):
    d = Driver(make_core(policy, device, host, threshold=threshold, reserve=reserve,
                         max_batch_tokens=batch_tokens, max_batch_requests=4))
    sched, cache = d.sched, d.sched.cache
    # Batched victim selection (one scoring pass queues several victims, as large caches do by
    # default) with batches small enough for these tiny tiers to need several passes.
    cache._device_batch = cache._host_batch = victims_per_pass
    next_turn = {c: 0 for c in range(len(conversations))}
    due = {c: gaps[c % len(gaps)] for c in range(len(conversations))}
    step = 0
    issued = []
    while step < 5000:
        for c, at in list(due.items()):
            if at <= step:
                prompt, output = conversations[c][next_turn[c]]
                del due[c]
                conv = cache.conversations.get(c)
                total = (conv.tokens if conv else 0) + prompt + output
                if -(-total // cache.chunk_tokens) > device:  # refused up front, never half-served
                    with pytest.raises(ValueError, match="device tier holds only"):
                        d.add(c, next_turn[c], step * 0.01, prompt, output)
                    conversations[c] = conversations[c][: next_turn[c]]
                    continue
                issued.append(d.add(c, next_turn[c], step * 0.01, prompt, output))
                next_turn[c] += 1
        if sched.idle and not due:
            break
        step += 1
        plan, finished = d.step(step * 0.01)
        # chunks of running requests are pinned on the device tier
        for r in sched.running:
            conv = r.conversation
            assert conv.active and all(slot >= 0 for slot in conv.dev)
            assert conv.chunks * cache.chunk_tokens >= conv.kv_tokens
        # dropped chunks form a leading run (a trailing one for trailing-first policies)
        for conv in cache.conversations.values():
            dropped = [conv.dev[i] < 0 and conv.host[i] < 0 for i in range(conv.chunks)]
            run = dropped[::-1] if cache.trailing else dropped
            assert run == sorted(run, reverse=True)
        for r in finished:
            c = r.conversation_id
            if next_turn[c] < len(conversations[c]):
                due[c] = step + gaps[(c + next_turn[c]) % len(gaps)]
    assert sched.idle and not due, "every turn, suspended ones included, finishes"
    for r in issued:
        assert r.generated == r.output_tokens
        assert r.gpu_hit_tokens + r.cpu_hit_tokens + r.recomputed_tokens == r.history_tokens
        assert r.first_token is not None and r.first_token <= r.finish
    if policy == "stateless":
        assert all(r.gpu_hit_tokens == r.cpu_hit_tokens == 0 for r in issued)
    # every token of every conversation is accounted for: KV computed, or pending (the last answer token)
    for c, conv in cache.conversations.items():
        total = sum(p + o for p, o in conversations[c][: next_turn[c]])
        assert conv.tokens == total and conv.kv_tokens == total - 1


@pytest.mark.parametrize("policy", ["pensieve", "lru", "trailing-lru"])
@pytest.mark.parametrize("budget", [1, 7, 25, 400])
@pytest.mark.parametrize("conversations", [12, 40])  # the plain-Python merge and the numpy path
def test_a_scoring_pass_picks_the_lowest_scoring_chunks_as_one_run_per_conversation(policy, budget, conversations):
    import random

    from pensieve.cache import FEW_CANDIDATES

    assert 12 <= FEW_CANDIDATES < 40  # so the two sizes take the two paths
    d = Driver(make_core(policy, device=2000, host=0))
    cache = d.sched.cache
    rng = random.Random(budget)
    now = 0.0
    for c in range(conversations):  # idle conversations of different lengths and ages
        d.add(c, 0, now, rng.randint(1, 40), rng.randint(1, 8))
        now = d.run(now + rng.random())
    now += 5.0
    candidates = list(cache.idle_device.values())
    expected = sorted(
        (cache.policy.score(conv.chunks - 1 - k if cache.trailing else k, now - conv.last_active), order, conv.id, k)
        for order, conv in enumerate(candidates) for k in range(conv.b, conv.chunks))[:budget]
    runs = cache._pick_chunks(candidates, now, True, budget)
    picked = [(conv.id, k) for conv, first, count in runs for k in range(first, first + count)]
    assert sorted(picked) == sorted((cid, k) for _, _, cid, k in expected)
    assert len({conv.id for conv, _, _ in runs}) == len(runs)  # one run per conversation
    first_scores = [cache.policy.score(conv.chunks - 1 - first if cache.trailing else first, now - conv.last_active)
                    for conv, first, _ in runs]
    assert first_scores == sorted(first_scores)  # queued by their lowest score
