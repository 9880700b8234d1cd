"""Exact eviction order of every policy on tiny caches (4-token chunks, Cost(l) = l + 1)."""
import pytest

from .helpers import Driver, make_core


def two_idle_conversations(policy: str, device: int = 8, host: int = 8):
    """A (3 chunks, idle since ~0) and B (2 chunks, idle since ~2) on an 8-slot device tier."""
    d = Driver(make_core(policy, device, host))
    d.add("A", 0, 0.0, 11, 1)  # 11 computed tokens: chunks of 4, 4, 3
    d.run(0.0)
    d.add("B", 0, 2.0, 7, 1)
    d.run(2.0)
    return d


def layout(d, conv):
    c = d.sched.cache.conversations[conv]
    return (c.drop_end, c.host_end, c.copy_end, c.chunks)


def test_pensieve_evicts_by_cost_over_idle_time_leading_chunks_first():
    d = two_idle_conversations("pensieve")
    cache = d.sched.cache
    a_first_slot = cache.conversations["A"].dev[0]
    d.add("C", 0, 10.0, 16, 1)  # 4 chunks, 3 free: one eviction
    plan, _ = d.step(10.0)
    # A's leading chunk: V = 1/10 beats B's 1/8; it is copied to host slot 0 and its slot reused
    assert plan.swap_out == [(a_first_slot, 0)]
    assert layout(d, "A") == (0, 1, 1, 3) and layout(d, "B") == (0, 0, 0, 2)
    assert a_first_slot in cache.conversations["C"].dev
    d.add("D", 0, 12.0, 4, 1)  # one more chunk
    d.step(12.0)
    # A's next chunk costs 5/12 = 0.42, B's leading chunk 1/10: B goes, though A is older
    assert layout(d, "A") == (0, 1, 1, 3) and layout(d, "B") == (0, 1, 1, 2)


def test_lru_evicts_oldest_conversation_leading_chunks_first():
    d = two_idle_conversations("lru")
    d.add("C", 0, 10.0, 16, 1)
    d.step(10.0)
    d.add("D", 0, 12.0, 4, 1)
    d.step(12.0)
    assert layout(d, "A") == (0, 2, 2, 3) and layout(d, "B") == (0, 0, 0, 2)


def test_pensieve_gpu_drops_leading_chunks_and_recomputes_them_before_the_prompt():
    d = two_idle_conversations("pensieve-gpu")
    assert d.sched.cache.host.capacity == 0
    d.add("C", 0, 10.0, 16, 1)
    plan, _ = d.step(10.0)
    assert plan.swap_out == [] and plan.dropped_chunks == 1
    assert layout(d, "A") == (1, 1, 1, 3)
    d.run(10.0)
    a = d.add("A", 1, 20.0, 1, 1)  # A has 12 tokens; the 12th (its last answer token) is pending
    plan, _ = d.step(20.0)
    [item] = [p for p in plan.prefills if p.request_id == a.id]
    assert item.spans == [(0, 4), (11, 2)]  # recompute the dropped chunk | pending token + prompt
    assert (a.gpu_hit_tokens, a.cpu_hit_tokens, a.recomputed_tokens, a.new_prompt_tokens) == (7, 0, 4, 2)


def test_pensieve_host_tier_drops_by_the_same_policy_when_full():
    d = two_idle_conversations("pensieve", host=1)
    d.add("C", 0, 10.0, 16, 1)
    d.step(10.0)  # A0 -> host (host now full)
    d.add("D", 0, 12.0, 4, 1)
    plan, _ = d.step(12.0)  # B0 must go to host: A0 is dropped from the host to make room
    assert layout(d, "A") == (1, 1, 1, 3) and layout(d, "B") == (0, 1, 1, 2)
    assert plan.dropped_chunks == 1 and len(plan.swap_out) == 1
    d.run(12.0)
    b = d.add("B", 1, 20.0, 1, 1)
    d.run(20.0)
    assert (b.gpu_hit_tokens, b.cpu_hit_tokens, b.recomputed_tokens) == (3, 4, 0)
    assert b.swap_in_chunks == 1
    a = d.add("A", 1, 30.0, 1, 1)
    d.run(30.0)
    assert (a.gpu_hit_tokens, a.cpu_hit_tokens, a.recomputed_tokens) == (7, 0, 4)


def test_trailing_lru_evicts_the_end_and_reuses_only_the_kept_prefix():
    d = two_idle_conversations("trailing-lru", host=1)
    d.add("C", 0, 10.0, 16, 1)
    d.step(10.0)  # A's last chunk -> host
    assert layout(d, "A") == (0, 1, 1, 3)
    assert d.sched.cache.conversations["A"].dev[2] == -1
    d.add("D", 0, 12.0, 4, 1)
    d.step(12.0)  # A's middle chunk -> host; its last chunk is dropped from the full host
    a_conv = d.sched.cache.conversations["A"]
    assert layout(d, "A") == (1, 2, 2, 3)
    assert a_conv.dev[0] >= 0 and a_conv.host[1] >= 0 and a_conv.dev[2] == a_conv.host[2] == -1
    d.run(12.0)
    a = d.add("A", 1, 20.0, 1, 1)
    plan, _ = d.step(20.0)
    [item] = [p for p in plan.prefills if p.request_id == a.id]
    assert item.spans == [(8, 5)]  # the dropped tail, the pending token and the prompt: one span
    assert (a.gpu_hit_tokens, a.cpu_hit_tokens, a.recomputed_tokens) == (4, 4, 3)


def test_conversation_lru_moves_a_whole_conversation():
    d = two_idle_conversations("conversation-lru")
    d.add("C", 0, 10.0, 16, 1)
    plan, _ = d.step(10.0)
    assert len(plan.swap_out) == 3  # all of A is copied; one slot is reused at once
    assert layout(d, "A") == (0, 1, 3, 3)
    d.add("D", 0, 12.0, 4, 1)
    plan, _ = d.step(12.0)
    assert plan.swap_out == []  # A's next copy was already on the host: reclaimed for free
    assert layout(d, "A") == (0, 2, 3, 3) and layout(d, "B") == (0, 0, 0, 2)


def test_stateless_reuses_nothing():
    d = Driver(make_core("stateless", 8, 8))
    d.add("A", 0, 0.0, 11, 1)
    d.run(0.0)
    assert d.sched.cache.device.used == 0 and layout(d, "A") == (3, 3, 3, 3)
    a = d.add("A", 1, 5.0, 1, 1)
    plan, _ = d.step(5.0)
    assert plan.prefills[0].spans == [(0, 13)]
    assert (a.gpu_hit_tokens, a.cpu_hit_tokens, a.recomputed_tokens, a.new_prompt_tokens) == (0, 0, 11, 2)


@pytest.mark.parametrize("policy", ["pensieve", "pensieve-gpu", "lru", "conversation-lru", "trailing-lru", "lfu", "slru",
                                    "arc", "tlru", "trailing-tlru", "session-aware"])
def test_large_cache_recomputes_nothing(policy):
    d = Driver(make_core(policy, 1000, 1000))
    now = 0.0
    for turn in range(4):
        reqs = [d.add(f"c{i}", turn, now, 7 + i, 5 + turn) for i in range(6)]
        now = d.run(now) + 1.0
        assert all(r.recomputed_tokens == 0 and r.cpu_hit_tokens == 0 for r in reqs)
        assert all(r.gpu_hit_tokens == r.history_tokens for r in reqs)
    assert d.sched.cache.stats.dropped_chunks == 0


def test_stateless_recomputes_every_history_token():
    d = Driver(make_core("stateless", 1000, 1000))
    now = 0.0
    for turn in range(3):
        reqs = [d.add(f"c{i}", turn, now, 7 + i, 5) for i in range(4)]
        now = d.run(now) + 1.0
        assert all(r.recomputed_tokens == r.history_tokens and r.gpu_hit_tokens == 0 for r in reqs)
        if turn:
            assert all(r.history_tokens > 0 for r in reqs)


def test_user_policy_by_import_path():
    d = Driver(make_core("tests.pensieve.user_policy:NewestFirst", 8, 0))
    d.add("A", 0, 0.0, 11, 1)
    d.run(0.0)
    d.add("B", 0, 2.0, 7, 1)
    d.run(2.0)
    d.add("C", 0, 10.0, 16, 1)
    d.step(10.0)
    assert layout(d, "B") == (1, 1, 1, 2) and layout(d, "A") == (0, 0, 0, 3)  # the newest idle goes first


def test_unknown_policy_lists_the_allowed_names():
    with pytest.raises(ValueError, match="allowed: pensieve, pensieve-gpu, lru"):
        make_core("fifo", 8, 8)
    with pytest.raises(ValueError, match="cannot be imported"):
        make_core("no_such_module:Policy", 8, 8)


# ---------------------------------------------------------------------------------------------
# The policies other engines ship. Victim order is read straight from the device tier's index
# (`take` answers the next victims without moving anything), one run per conversation.


def conversations_with_uses(policy: str, **params):
    """A used three times (idle longest), B twice, C once (idle shortest); each turn adds 4 tokens."""
    d = Driver(make_core(policy, 64, 64, params=params))
    now = 0.0
    for conv, turns in (("A", 3), ("B", 2), ("C", 1)):
        for turn in range(turns):
            d.add(conv, turn, now, 3, 1)
            now = d.run(now) + 1.0
    return d, now


def next_victims(d, now, count):
    return [(conv.id, chunks) for conv, chunks in d.sched.cache.device_victims.take(now, count)]


def test_lfu_evicts_the_least_used_conversation_first():
    d, now = conversations_with_uses("lfu")
    assert next_victims(d, now, 6) == [("C", 1), ("B", 2), ("A", 3)]
    d_lru, now = conversations_with_uses("lru")
    assert next_victims(d_lru, now, 6) == [("A", 3), ("B", 2), ("C", 1)]  # the contrast: idle time alone


def test_slru_evicts_the_probationary_segment_first_then_the_protected_one_oldest_first():
    d, now = conversations_with_uses("slru")
    assert next_victims(d, now, 6) == [("C", 1), ("A", 3), ("B", 2)]
    d, now = conversations_with_uses("slru", protect_after=3)  # only A is protected now
    assert next_victims(d, now, 6) == [("B", 2), ("C", 1), ("A", 3)]


def test_policy_params_out_of_range_name_the_key():
    with pytest.raises(ValueError, match=r"cache.policy.params \(slru\): protect_after must be .* got 0"):
        make_core("slru", 8, 8, params={"protect_after": 0})
    with pytest.raises(ValueError, match=r"cache.policy.params \(tlru\): threshold_tokens must be"):
        make_core("tlru", 8, 8, params={"threshold_tokens": -1})
    with pytest.raises(ValueError, match="does not accept them"):
        make_core("arc", 8, 8, params={"p": 1})


def test_arc_moves_its_target_towards_recency_after_a_recent_ghost_returns():
    d = Driver(make_core("arc", 8, 0))
    arc = d.sched.cache.policy
    d.add("X", 0, 0.0, 7, 1)  # X: used once (T1), 2 chunks
    d.run(0.0)
    d.add("Y", 0, 1.0, 7, 1)
    d.run(1.0)
    d.add("Y", 1, 2.0, 3, 1)  # Y: reused (T2), 3 chunks
    d.run(2.0)
    assert arc.sizes == {"t1": 1, "t2": 1, "b1": 0, "b2": 0} and arc.target_t1 == 0
    d.add("Z", 0, 3.0, 23, 1)  # Z needs 6 slots, 3 are free: T1 is over its target (0), so X goes first
    d.run(3.0)
    assert layout(d, "X") == (2, 2, 2, 2) and layout(d, "Y") == (1, 1, 1, 3)
    assert arc.sizes == {"t1": 1, "t2": 1, "b1": 1, "b2": 0}  # X is a ghost of T1 (B1); Z is in T1
    d.add("X", 1, 5.0, 3, 1)  # X comes back from B1: T1 should have been bigger
    d.run(5.0)
    assert arc.target_t1 == 1
    # X needed 3 slots: with |T1| = 1 = p, T2 goes first: Y's 2 device chunks (lost: a ghost of T2),
    # then Z's leading chunk; without the move of p, Z (T1) would have given all 3.
    assert layout(d, "Y") == (3, 3, 3, 3) and layout(d, "Z") == (1, 1, 1, 6)
    assert arc.sizes == {"t1": 1, "t2": 1, "b1": 0, "b2": 1}


def two_long_conversations(policy: str, **params):
    """A (idle longest) and B, 3 chunks each."""
    d = Driver(make_core(policy, 64, 64, params=params))
    d.add("A", 0, 0.0, 11, 1)
    d.run(0.0)
    d.add("B", 0, 1.0, 11, 1)
    now = d.run(1.0)
    return d, now + 1.0


def test_tlru_evicts_every_conversations_safe_chunks_before_anyones_protected_ones():
    # threshold 10 tokens, next prompt 2: 8 tokens (2 chunks) of each conversation are safe
    d, now = two_long_conversations("tlru", threshold_tokens=10, next_prompt_tokens=2)
    assert next_victims(d, now, 4) == [("A", 2), ("B", 2)]
    assert next_victims(d, now, 5) == [("A", 3), ("B", 2)]  # then protected chunks, oldest first
    d, now = two_long_conversations("lru")
    assert next_victims(d, now, 4) == [("A", 3), ("B", 1)]
    d, now = two_long_conversations("tlru", threshold_tokens=10, next_prompt_tokens=8)  # nothing is safe: LRU
    assert next_victims(d, now, 4) == [("A", 3), ("B", 1)]


def test_trailing_tlru_counts_safe_chunks_from_the_end():
    d, now = two_long_conversations("trailing-tlru", threshold_tokens=8, next_prompt_tokens=0)
    assert next_victims(d, now, 4) == [("A", 2), ("B", 2)]  # A's last two chunks, then B's
    a = d.sched.cache.conversations["A"]
    tlru = d.sched.cache.policy
    assert [tlru.score_conversation(a, i, 1.0)[0] for i in range(3)] == [1, 0, 0]  # chunk 0 is protected


def test_session_aware_evicts_the_conversation_most_overdue_for_its_own_think_time():
    d = Driver(make_core("session-aware", 64, 64))
    for conv, turns in (("B", (0.0, 100.0)), ("A", (105.0, 106.0))):  # B comes back after ~100 s, A after ~1 s
        for turn, at in enumerate(turns):
            d.add(conv, turn, at, 3, 1)
            d.run(at)
    now = 116.0  # A is idle ~10 of its think times, B ~0.16 of its own
    assert next_victims(d, now, 1) == [("A", 1)]
    d.sched.cache.policy.gaps["A"] = (1000.0, 1)  # had A's think time been 1000 s, B would be the more overdue
    assert next_victims(d, now, 1) == [("B", 1)]
