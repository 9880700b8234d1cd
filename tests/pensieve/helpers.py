"""Small cores and a loop driver for exact tests."""
from __future__ import annotations

from pensieve.backends import BookkeepingBackend
from pensieve.config import SchedulerConfig
from pensieve.core import build_core
from pensieve.cost import LinearCostModel
from pensieve.request import Request


def make_core(policy: str, device: int, host: int, chunk_tokens: int = 4, reserve: float = 0.0,
              threshold: float = 0.0, max_batch_tokens: int = 256, max_batch_requests: int = 16,
              cost: LinearCostModel | None = None, max_context: int = 4096, victim_index=None,
              batching: str = "unified", queue_aware: bool = False, params: dict | None = None):
    """A core over a tiny cache, from the factory every driver uses; ahead-of-time swap-out copies
    one chunk past its shortfall."""
    scheduler = SchedulerConfig(max_batch_tokens=max_batch_tokens, max_batch_requests=max_batch_requests,
                                decode_reserve=reserve, swap_out_threshold=threshold, swap_out_batch=0.0,
                                batching=batching, queue_aware=queue_aware)
    return build_core(policy=policy, cost_model=cost or LinearCostModel(1.0, 1.0), device_slots=device,
                      host_slots=host, chunk_tokens=chunk_tokens, max_context=max_context, scheduler=scheduler,
                      victim_index=victim_index, policy_params=params)


# A user policy by import path: any score that keeps the contract, served by the exact scan.
USER_POLICY = "tests.pensieve.user_policy:NewestFirst"


class VictimCheck:
    """Counts the victim answers checked against brute force."""

    def __init__(self) -> None:
        self.answers = 0
        self.victims = 0


def brute_force_victims(cache, region, now: float, count: int) -> list[tuple]:
    """The next `count` victims of a region at `now` by definition: every idle conversation's every
    chunk in the region, sorted by (score, release number, eviction position); as one run (id, chunks)
    per conversation, in the order of its first victim."""
    policy, order = cache.policy, cache.order
    first, end = region.first, region.end

    def score(c, chunk_index):  # the policy's own score, computed afresh for every chunk
        return policy.score_conversation(c, chunk_index, now - c.last_active)

    if cache.whole_conversation:  # a victim is a conversation, ranked by its head
        heads = sorted((score(c, order.index(c.chunks, first(c))), c.released, c.id,
                        end(c) - first(c)) for c in cache.conversations.values()
                       if not c.active and first(c) < end(c))
        runs = []
        for _, _, cid, chunks in heads:
            if count <= 0:
                break
            runs.append((cid, chunks))
            count -= chunks
        return runs
    chunks = sorted((score(c, order.index(c.chunks, p)), c.released, p, c.id)
                    for c in cache.conversations.values() if not c.active for p in range(first(c), end(c)))
    runs: dict = {}  # one run per conversation, in the order of its first victim
    for _, _, _, cid in chunks[:count]:
        runs[cid] = runs.get(cid, 0) + 1
    return list(runs.items())


def check_every_victim(cache) -> VictimCheck:
    """Make every answer of the cache's three victim indexes be checked against `brute_force_victims`."""
    check = VictimCheck()
    for index in (cache.device_victims, cache.clean_victims, cache.host_victims):
        take = index.take

        def checked_take(now, count, take=take, region=index.region):
            runs = take(now, count)
            want = brute_force_victims(cache, region, now, count)
            assert [(conv.id, chunks) for conv, chunks in runs] == want, (region, now, count, runs, want)
            check.answers += 1
            check.victims += sum(chunks for _, chunks in runs)
            return runs

        index.take = checked_take
    return check


class Driver:
    """Runs the core's loop with a bookkeeping backend, checking invariants after every step."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.backend = BookkeepingBackend()
        self.next_id = 0
        self.plans = []

    def add(self, conv, turn: int, now: float, prompt: int, output: int) -> Request:
        r = Request(self.next_id, conv, turn, now, prompt, output)
        self.next_id += 1
        self.sched.add_request(r)
        return r

    def step(self, now: float):
        offered, added = getattr(self, "_offered", (None, -1))
        plan = self.sched.schedule(now)
        self.plans.append(plan)
        if offered and added == self.next_id:  # promised a plain decode step, and no turn arrived since
            assert plan.decodes and not plan.prefills and not plan.swap_in and not plan.swap_out \
                and not plan.suspended and not plan.dropped_chunks, plan
            assert (len(plan.decodes), plan.decode_context_tokens) == offered[:2], (plan, offered)
        ct = self.sched.cache.chunk_tokens
        for rid in plan.decodes:  # every query token has a device slot for its KV before the step runs
            conv = self.sched.requests[rid].conversation
            assert conv.active and conv.kv_tokens < conv.chunks * ct and min(conv.dev) >= 0
        for item in plan.prefills:
            conv = self.sched.requests[item.request_id].conversation
            assert conv.active and item.context_tokens <= conv.chunks * ct and min(conv.dev) >= 0
        result = self.backend.execute(plan)
        will_finish = self.sched.completion_finishes(plan)
        finished = self.sched.complete(plan, result, now)
        assert will_finish == bool(finished) or result.stopped, (will_finish, finished)
        self.sched.check_invariants()
        ahead = self.sched.plain_steps()
        if offered and added == self.next_id:
            assert not finished
            if offered[2] > 1:  # a run with nothing due: the rest of it is still on offer
                assert ahead == (offered[0], offered[1] + offered[0], offered[2] - 1), (offered, ahead)
        if ahead is not None:
            assert ahead[2] >= 1 and ahead[0] == len(self.sched.running)
        self._offered = (ahead, self.next_id)
        return plan, finished

    def run(self, now: float, dt: float = 0.001, limit: int = 10_000) -> float:
        """Step until nothing waits or runs; returns the clock."""
        for _ in range(limit):
            if self.sched.idle:
                return now
            now += dt
            self.step(now)
        raise AssertionError("the scheduler did not drain")
