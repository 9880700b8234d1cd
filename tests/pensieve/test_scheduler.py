"""Unified batching, admission budgets, the decode reserve, ahead-of-time swap-out, suspension."""
import pytest

from pensieve.request import Request

from .helpers import Driver, make_core


def test_prefill_recompute_and_decodes_share_one_step():
    d = Driver(make_core("pensieve-gpu", 8, 0))
    d.add("A", 0, 0.0, 11, 1)
    d.run(0.0)
    d.add("B", 0, 1.0, 4, 3)
    d.step(1.0)  # B prefills
    d.add("C", 0, 1.0, 16, 1)  # forces A's leading chunk out
    d.step(1.001)
    a = d.add("A", 1, 1.002, 1, 2)
    plan, _ = d.step(1.002)
    assert plan.decodes == [1]  # B decodes while A recomputes its dropped chunk and prefills
    [item] = plan.prefills
    assert item.request_id == a.id and item.spans == [(0, 4), (11, 2)]
    assert plan.num_tokens == 1 + 6


def test_admission_respects_token_and_request_budgets():
    d = Driver(make_core("pensieve", 100, 0, max_batch_tokens=25, max_batch_requests=2))
    for i in range(3):
        d.add(f"c{i}", 0, 0.0, 10, 5)
    plan, _ = d.step(0.0)
    assert [p.request_id for p in plan.prefills] == [0, 1]  # the third would pass 25 tokens
    plan, _ = d.step(0.001)
    assert plan.decodes == [0, 1] and plan.prefills == []  # two requests at most
    d.run(0.001)
    assert all(r.generated == 5 for r in d.sched.finished)


def test_a_request_larger_than_the_token_budget_runs_alone():
    d = Driver(make_core("pensieve", 100, 0, max_batch_tokens=8))
    r = d.add("A", 0, 0.0, 30, 2)
    plan, _ = d.step(0.0)
    assert plan.prefills[0].query_tokens == 30
    d.run(0.0)
    assert r.done


def test_decode_reserve_holds_back_admission():
    d = Driver(make_core("pensieve", 10, 0, reserve=0.5))
    first = d.add("A", 0, 0.0, 12, 2)  # 3-4 chunks
    second = d.add("B", 0, 0.0, 12, 2)
    plan, _ = d.step(0.0)
    assert [p.request_id for p in plan.prefills] == [first.id]  # 4 + 4 chunks would pass 5
    d.run(0.0)
    assert second.admitted > first.admitted and second.done


def test_ahead_of_time_swap_out_keeps_device_copies():
    d = Driver(make_core("pensieve", 8, 8, threshold=0.5))
    d.add("A", 0, 0.0, 11, 1)
    d.run(0.0)
    d.add("B", 0, 2.0, 7, 1)
    plan, _ = d.step(2.0)
    # 3 free of 8 < 50%: one batch past the threshold is copied out, leading chunks of A first
    cache = d.sched.cache
    a = cache.conversations["A"]
    assert len(plan.swap_out) == 2 and (a.drop_end, a.host_end, a.copy_end) == (0, 0, 2)
    assert all(slot >= 0 for slot in a.dev)  # still on the device: reclaimed only when needed
    assert cache.clean_count == 2
    r = d.add("A", 1, 3.0, 1, 1)
    d.run(3.0)
    assert r.gpu_hit_tokens == 11 and r.cpu_hit_tokens == 0


def test_an_idle_core_copies_nothing_out_since_an_empty_plan_may_be_dropped():
    # Found by validation: the simulator asked an idle core to plan, and dropped the empty plan; its
    # ahead-of-time swap-out still copied every device chunk out and dropped the host chunks that later
    # turns would have hit (sim recomputed 2.1x the real engine's tokens on validate/lru-pressure).
    d = Driver(make_core("lru", 8, 8, threshold=0.9))
    d.add("A", 0, 0.0, 23, 1)  # 6 of 8 device slots: below the 90% free threshold
    d.run(0.0)
    cache = d.sched.cache
    copied = cache.stats.swap_out_chunks
    plan = d.sched.schedule(5.0)  # nothing waits or runs
    assert plan.empty and not plan.swap_out and not plan.dropped_chunks
    assert cache.stats.swap_out_chunks == copied and cache.clean_count == copied
    cache.check_invariants()


@pytest.mark.parametrize("policy", ["pensieve", "pensieve-gpu", "lru", "conversation-lru", "trailing-lru", "stateless"])
def test_decodes_out_of_slots_suspend_the_latest_arrival_which_comes_back(policy):
    d = Driver(make_core(policy, 6, 8))
    first = d.add("X", 0, 0.0, 4, 12)  # each grows to 4 chunks: 8 > 6 slots
    second = d.add("Y", 0, 0.0005, 4, 12)
    d.run(0.001)
    suspended = [rid for plan in d.plans for rid in plan.suspended]
    assert suspended and set(suspended) == {second.id}
    assert first.suspensions == 0 and second.suspensions >= 1
    assert first.generated == second.generated == 12
    assert first.finish < second.finish


def test_turn_over_the_context_limit_is_refused():
    d = Driver(make_core("pensieve", 100, 0, max_context=64))
    with pytest.raises(ValueError, match="maximum context of 64"):
        d.add("A", 0, 0.0, 60, 10)


def test_turn_larger_than_the_device_tier_is_refused():
    d = Driver(make_core("pensieve", 4, 100))
    with pytest.raises(ValueError, match="device tier holds only 4"):
        d.add("A", 0, 0.0, 15, 3)


def test_a_conversation_has_one_open_turn_at_a_time():
    d = Driver(make_core("pensieve", 100, 0))
    d.add("A", 0, 0.0, 5, 5)
    with pytest.raises(ValueError, match="already has an unfinished turn"):
        d.add("A", 1, 0.0, 5, 5)


def test_requests_validate_their_counts():
    with pytest.raises(ValueError, match="output_tokens"):
        Request(0, "A", 1, 0.0, 3, 0)


def test_backend_reported_eos_finishes_a_turn_early():
    from pensieve.plan import StepResult

    sched = make_core("pensieve", 100, 0)
    r = Request(0, "A", 0, 0.0, 5, 50)
    sched.add_request(r)
    plan = sched.schedule(0.0)
    sched.complete(plan, StepResult(stopped=frozenset({0})), 0.1)
    assert r.done and r.stopped_early and r.generated == 1
    assert sched.cache.conversations["A"].tokens == 6


def test_counters_of_running_turns_advance_every_step_without_being_visited():
    sched = make_core("pensieve", 100, 0, chunk_tokens=4)
    d = Driver(sched)
    a = d.add("A", 0, 0.0, 5, 12)
    b = d.add("B", 0, 0.0, 3, 7)
    d.step(0.1)  # both prefill and produce their first token
    for k in range(2, 8):
        d.step(0.1 * k)
        assert a.generated == b.generated == k
        assert sched.cache.conversations["A"].tokens == 5 + k and sched.cache.conversations["B"].tokens == 3 + k
    assert b.done and b.generated == 7 and not a.done
    d.run(1.0)
    assert a.generated == 12 and sched.cache.conversations["A"].kv_tokens == 16  # the last token's KV is pending
    assert not a.decoding and sched.clock.ticks == 11  # the clock counts steps with decodes: all but the first


def test_complete_takes_only_the_plan_awaiting_completion():
    sched = make_core("pensieve", 100, 0)
    empty = sched.schedule(0.0)
    assert empty.empty
    sched.add_request(Request(0, "A", 0, 0.0, 5, 3))  # an empty plan may be dropped unfinished
    plan = sched.schedule(0.1)
    with pytest.raises(RuntimeError, match="not completed"):
        sched.schedule(0.2)
    with pytest.raises(RuntimeError, match="awaiting completion"):
        sched.complete(empty, None, 0.2)
    sched.complete(plan, None, 0.2)
    with pytest.raises(RuntimeError, match="awaiting completion"):
        sched.complete(plan, None, 0.3)  # twice


def test_plain_steps_taken_at_once_equal_steps_planned_one_by_one():
    def core():
        sched = make_core("pensieve", 100, 0, chunk_tokens=4)
        d = Driver(sched)
        d.add("A", 0, 0.0, 5, 20)
        d.add("B", 0, 0.0, 9, 9)
        d.step(0.1)
        return sched, d

    def state(sched):
        return ([(r.id, r.generated, r.conversation.tokens, r.conversation.kv_tokens, list(r.conversation.dev))
                 for r in sched.running], sched.steps, sched.clock.ticks, list(sched.cache.device.free))

    stepped, d = core()
    taken, _ = core()
    # A holds 5 tokens' KV in 2 chunks of 4, B 9 in 3: both fill their last chunk in 3 decodes
    # (nothing due), the 4th takes a new chunk each (a plain step of its own); B's turn ends after 8.
    decodes, context, count = taken.plain_steps()
    assert (decodes, count) == (2, 3)
    with pytest.raises(ValueError, match="plain_steps"):
        taken.take_plain_steps(count + 1, 0.2)
    taken.plain_steps()
    taken.take_plain_steps(count, 0.2)
    for k in range(count):  # the Driver asserts each is the plain decode step on offer
        plan = d.step(0.2 + k)[0]
        assert (len(plan.decodes), plan.decode_context_tokens) == (decodes, context + k * decodes)
    assert state(stepped) == state(taken)
    assert taken.plain_steps() == (2, context + 3 * decodes, 1)  # the step with new chunks
    taken.take_plain_steps(1, 3.0)
    d.step(3.0)
    assert state(stepped) == state(taken) and [r.conversation.chunks for r in taken.running] == [3, 4]
    taken.check_invariants()
    with pytest.raises(ValueError, match="plain_steps"):
        taken.take_plain_steps(1, 3.1)  # nothing offered since
    decodes, context, count = taken.plain_steps()
    assert count == 3  # then A needs a 4th chunk in the step that ends B's turn: not plain
    taken.take_plain_steps(count - 1, 3.1)
    assert taken.plain_steps() == (2, context + 2 * decodes, 1)
    taken.add_request(Request(99, "C", 0, 3.05, 4, 2))
    with pytest.raises(ValueError, match="plain_steps"):
        taken.take_plain_steps(1, 3.2)  # a turn arrived since the offer
    assert taken.plain_steps() is None  # it waits to be admitted


def test_prefill_first_runs_prompt_steps_alone_as_vllm_0_2_did():
    plans = {}
    for batching in ("unified", "prefill-first"):
        d = Driver(make_core("pensieve", 100, 0, chunk_tokens=4, batching=batching))
        a = d.add("A", 0, 0.0, 5, 6)
        d.step(0.0)  # A's prompt
        d.step(0.1)  # A decodes
        b = d.add("B", 0, 0.15, 3, 2)
        plan, _ = d.step(0.2)
        plans[batching] = plan
        d.run(1.0)
        assert a.generated == 6 and b.generated == 2 and a.done and b.done
        assert d.sched.cache.conversations["A"].tokens == 11 and d.sched.cache.conversations["B"].tokens == 5
    unified, first = plans["unified"], plans["prefill-first"]
    assert unified.decodes == [0] and [p.request_id for p in unified.prefills] == [1]  # one batch of both
    assert first.decodes == [] and [p.request_id for p in first.prefills] == [1]  # the prompt alone: A waits
    from pensieve.scheduler import Scheduler

    with pytest.raises(ValueError, match="batching 'fifo'"):
        Scheduler(d.sched.cache, 64, 4, 0.0, 0.0, 4096, batching="fifo")
    with pytest.raises(ValueError, match="unified"):  # the scenario schema names what is allowed
        make_core("pensieve", 10, 0, batching="fifo")


def test_prefill_first_decodes_when_no_prompt_can_be_admitted():
    d = Driver(make_core("pensieve", 8, 0, chunk_tokens=4, batching="prefill-first", max_batch_requests=1))
    a = d.add("A", 0, 0.0, 5, 4)
    d.step(0.0)
    d.add("B", 0, 0.05, 3, 2)  # the request budget is full: B waits, A keeps decoding
    plan, _ = d.step(0.1)
    assert plan.decodes == [a.id] and not plan.prefills
    d.run(1.0)
    assert all(r.done for r in d.sched.finished) and len(d.sched.finished) == 2


@pytest.mark.parametrize("policy", ["lru", "pensieve"])
def test_queue_aware_look_ahead_evicts_conversations_nobody_waits_on_first(policy):
    results = {}
    for queue_aware in (False, True):
        d = Driver(make_core(policy, 6, 0, chunk_tokens=4, queue_aware=queue_aware, max_batch_requests=1))
        d.add("A", 0, 0.0, 7, 1)  # 2 chunks
        d.run(0.0)
        d.add("B", 0, 1.0, 7, 1)  # released after A: B is the fresher idle conversation
        d.run(1.0)
        d.add("C", 0, 2.0, 11, 1)  # 3 chunks: one must go to admit it ...
        d.add("A", 1, 2.0, 2, 1)  # ... while A's next turn waits behind it (one request at a time)
        d.step(2.0)
        d.sched.check_invariants()
        results[queue_aware] = {c: conv.drop_end for c, conv in d.sched.cache.conversations.items()}
    # The paper's idle time: A, released first, loses a chunk though its turn waits. Queue-aware: B does.
    assert results[False]["A"] > 0 and results[False]["B"] == 0
    assert results[True]["A"] == 0 and results[True]["B"] > 0
