"""The plain-step protocol: decode steps a driver may carry out in bulk, without planning each.

Most steps of a long simulation are *plain*: the batch only decodes, no decode ends its turn,
nothing waits to be admitted, the decodes that need a new chunk get a free slot or a clean one
(its chunk already copied to the host), and after that the cache has nothing to swap out ahead
of time. Such a step changes nothing but token counters and (at most) those new chunks, so the
simulator takes runs of them in one call. The contract, which the tests' driver checks at every
step (tests/pensieve/helpers.py):

- `plain_steps()` answers `(decodes per step, the first step's summed decode context, count)`
  or None. Either the next step is plain with new chunks (count 1), or `count` steps in a row
  are plain with nothing due at all. Each step's context is the previous one's plus the decodes.
- The next `schedule` would plan exactly that first step: decodes only, no prefill, copy, drop
  or suspension, with those counts.
- `take_plain_steps(n, now)`, n <= count, has exactly the effect of n times `schedule(now)` +
  `complete(plan, None, now)`: the same new chunks, the same tokens. A turn added since the
  offer voids it (`take_plain_steps` refuses), as does any other step in between.
- After a plain step with nothing due, the rest of the run is still on offer.
- `completion_finishes(plan)` says whether completing a planned step would finish a turn; the
  simulator uses it to chain steps that finish nothing.
"""
from __future__ import annotations

import heapq

from .plan import StepPlan


def next_key(keys: list[int], lowest: int) -> float:
    """The smallest key >= `lowest` of a heap whose smaller keys are no longer needed (dropped here)."""
    while keys and keys[0] < lowest:
        heapq.heappop(keys)
    return keys[0] if keys else float("inf")


class PlainSteps:
    """The protocol's three calls, mixed into `Scheduler` (whose step clock and due lists they read)."""

    def completion_finishes(self, plan: StepPlan) -> bool:
        """Whether completing the planned step (with no early stops) would finish some request."""
        ticks = self.clock.ticks + 1
        due = self._finish_due.get(ticks) if plan.decodes else None  # only a plan with decodes moves the clock
        if due:
            for r in due:
                if r.finish_at == ticks:
                    return True
        if plan.prefills:
            requests = self.requests
            for item in plan.prefills:
                r = requests[item.request_id]
                if r.generated + 1 >= r.output_tokens:
                    return True
        return False

    def plain_steps(self) -> tuple[int, int, int] | None:
        """The plain decode steps just ahead, which a driver may carry out with `take_plain_steps`
        instead of planning and completing each (the simulator does): (decodes per step, the first
        step's summed decode context, how many steps), or None if the next step is not plain.

        A plain step has only decodes, none of which ends its turn, and nothing waiting to be
        admitted; the decodes that need a new chunk get a free slot or a clean one (its chunk is
        already copied to the host), and after that the cache has nothing to swap out ahead of
        time. Either the next step is such a step with new chunks (count 1), or a run of them
        with nothing due at all. Each step's context is the previous one's plus the decodes.
        """
        self._plain_ahead = None
        if self._planned is not None or self.waiting or not self.running:
            return None
        ticks = self.clock.ticks
        finish = next_key(self._finish_keys, ticks + 1)
        if finish == ticks + 1:
            return None  # a turn may end (or the entry is stale: the general path sorts it out)
        cache = self.cache
        due = self._grow_due.get(ticks)
        if due:
            grows = len(due)  # stale entries count too: this only errs towards None
            if grows > len(cache.device.free) + cache.clean_count \
                    or not cache.swap_out_idle(self.swap_out_threshold, after_taking=grows):
                return None
            count = 1
        else:
            if not cache.swap_out_idle(self.swap_out_threshold):
                return None
            count = min(next_key(self._grow_keys, ticks + 1) - ticks, finish - ticks - 1)
        self._plain_ahead = (ticks, count)
        n = len(self.running)
        return n, self._kv_base + n * (ticks + 1), count

    def take_plain_steps(self, count: int, now: float) -> None:
        """Carry out the first `count` of the steps `plain_steps` just described, the first starting
        at `now`, exactly as schedule + complete would: their new chunks, their tokens. Nothing may
        change in between (a turn added since makes the offer void)."""
        ticks = self.clock.ticks
        if self._plain_ahead is None or self._plain_ahead[0] != ticks or not 0 <= count <= self._plain_ahead[1] \
                or self.waiting:
            raise ValueError(f"take_plain_steps({count}): not within what plain_steps() last offered "
                             f"({self._plain_ahead})")
        self._plain_ahead = None
        if count:
            self._grow_decodes(ticks, now, None)  # the first step's new chunks, from free or clean slots
        self.steps += count
        self.clock.ticks = ticks + count
