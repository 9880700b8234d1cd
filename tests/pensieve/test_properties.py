"""Invariants of the cache and scheduler under random conversations, turns and capacities."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pensieve.policies import REGISTRY

from .helpers import USER_POLICY, Driver, check_every_victim, make_core

turns = st.lists(st.tuples(st.integers(1, 20), st.integers(1, 12)), min_size=1, max_size=4)


@settings(max_examples=90, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(sorted(REGISTRY) + [USER_POLICY]),
    device=st.integers(10, 40),
    host=st.integers(0, 30),
    threshold=st.sampled_from([0.0, 0.25, 0.5]),
    reserve=st.sampled_from([0.0, 0.1]),
    batch_tokens=st.sampled_from([8, 32, 256]),
    conversations=st.lists(turns, min_size=1, max_size=6),
    gaps=st.lists(st.integers(0, 30), min_size=30, max_size=30),
)
def test_random_workloads_keep_every_invariant_evict_exactly_and_finish(policy, device, host, threshold, reserve,
                                                                        batch_tokens, conversations, gaps):
    """Every victim any index answers is, at that moment, the lowest-scoring evictable chunk of its
    region (a brute-force sort over every idle conversation's chunks), on every tier."""
    d = Driver(make_core(policy, device, host, threshold=threshold, reserve=reserve,
                         max_batch_tokens=batch_tokens, max_batch_requests=4))
    checked = check_every_victim(d.sched.cache)
    run_random_workload(d, conversations, gaps)
    assert checked.answers >= 0


def run_random_workload(d, conversations, gaps) -> list:
    """Turns of `conversations` [(prompt, output), ...] arriving `gaps` steps after the previous one
    ends, through the driver, checking the layout after every step; returns the plans."""
    sched, cache = d.sched, d.sched.cache
    device = cache.device.capacity
    conversations = [list(turns) for turns in conversations]  # refused turns are cut from a copy
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
            run = [dropped[cache.order.index(conv.chunks, p)] for p in range(conv.chunks)]  # in eviction order
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
    if cache.policy.name == "stateless":
        assert all(r.gpu_hit_tokens == r.cpu_hit_tokens == 0 for r in issued)
    # every token of every conversation is accounted for: KV computed, or pending (the last answer token)
    for c, conv in cache.conversations.items():
        total = sum(p + o for p, o in conversations[c][: next_turn[c]])
        assert conv.tokens == total and conv.kv_tokens == total - 1
    return d.plans
