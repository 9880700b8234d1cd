"""Small cores and a loop driver for exact tests."""
from __future__ import annotations

from pensieve.backends import BookkeepingBackend
from pensieve.cache import KVCacheManager
from pensieve.cost import LinearCostModel
from pensieve.policies import make_policy
from pensieve.request import Request
from pensieve.scheduler import Scheduler


def make_core(policy: str, device: int, host: int, chunk_tokens: int = 4, reserve: float = 0.0,
              threshold: float = 0.0, max_batch_tokens: int = 256, max_batch_requests: int = 16,
              cost: LinearCostModel | None = None, max_context: int = 4096) -> Scheduler:
    """A scheduler over a tiny cache; eviction batch 1 so every eviction is scored exactly."""
    cache = KVCacheManager(device, host, chunk_tokens, make_policy(policy, cost or LinearCostModel(1.0, 1.0)),
                           max_context=max_context, eviction_batch=0.0)
    return Scheduler(cache, max_batch_tokens, max_batch_requests, reserve, threshold, max_context)


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
