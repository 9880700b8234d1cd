"""Iteration-level unified batching over the cache manager (§4.2, §4.3.5).

Every step: running requests decode one token each; requests that cannot get a slot for their
next token suspend the latest-arrived running request (its chunks become evictable and it
re-queues in arrival order); then waiting requests are admitted first-come first-served while
the batch has token and request room and the device tier keeps its decode reserve; finally
chunks are swapped out ahead of time when the device tier runs low.
"""
from __future__ import annotations

import bisect
import heapq
from collections import deque

from .cache import KVCacheManager
from .layout import computed_tokens
from .plain_steps import PlainSteps
from .plan import PrefillItem, StepPlan, StepResult
from .request import STILL, Request, StepClock


BATCHING = ("unified", "prefill-first")


def _arrival_key(request: Request) -> tuple[float, int]:
    return (request.arrival, request.id)


class Scheduler(PlainSteps):
    """Owns the waiting queue, the running batch and its budgets; the core's loop is
    `plan = schedule(now)`, a backend executes it, `complete(plan, result, now)`."""

    def __init__(self, cache: KVCacheManager, max_batch_tokens: int, max_batch_requests: int,
                 decode_reserve: float, swap_out_threshold: float, max_context: int,
                 batching: str = "unified", queue_aware: bool = False) -> None:
        """Built by `pensieve.core.build_core`; the settings' defaults and meaning are in `SchedulerConfig`."""
        if max_batch_tokens < 1 or max_batch_requests < 1:
            raise ValueError("max_batch_tokens and max_batch_requests must be >= 1")
        if batching not in BATCHING:
            raise ValueError(f"batching {batching!r}: expected one of {', '.join(BATCHING)}")
        # "prefill-first" is vLLM 0.2's iteration scheduler (the paper's baseline): a step that can admit
        # a waiting prompt runs prompts only, and the running batch decodes in the steps between.
        self.prefill_first = batching == "prefill-first"
        # Queue-aware look-ahead (as CachedAttention's): a conversation whose next turn waits in the queue is
        # not idle, so its idle time restarts when the turn arrives. Off by default: the paper counts idle
        # time from the last release whatever waits.
        self.queue_aware = queue_aware
        if not (0 <= decode_reserve < 1 and 0 <= swap_out_threshold < 1):
            raise ValueError("decode_reserve and swap_out_threshold are fractions in [0, 1)")
        self.cache = cache
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.decode_reserve = decode_reserve
        self.swap_out_threshold = swap_out_threshold
        self.max_context = max_context
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # ordered by arrival: suspension takes from the end
        self.requests: dict[int, Request] = {}  # unfinished requests by id
        self.finished: list[Request] = []
        self._open_turns: set = set()  # conversations with an unfinished turn
        self._running_ids: list[int] = []  # the ids of `running`, in its order: the next plan's decodes
        # Running requests' token counters follow this clock (see StepClock). The due lists hold,
        # per clock reading, the decodes whose next token needs a new chunk then (checked by
        # `schedule`) and those whose turn ends then (checked by `complete`); everything else
        # about a decode is known without visiting it.
        self.clock = StepClock()
        self._grow_due: dict[int, list[Request]] = {}
        self._finish_due: dict[int, list[Request]] = {}
        # The keys of each, as heaps (keys already handled are dropped lazily): the next clock
        # reading at which something is due, for `plain_steps`.
        self._grow_keys: list[int] = []
        self._finish_keys: list[int] = []
        self._kv_base = 0  # sum over decoding requests of (kv_tokens - clock.ticks): moves with no tick
        self._planned: int | None = None  # the step planned and not yet completed
        self._plain_ahead: tuple[int, int] | None = None  # (clock reading, count) plain_steps offered
        self.steps = 0
        self.suspensions = 0

    # ------------------------------------------------------------------ intake
    def add_request(self, request: Request) -> None:
        """Queue a turn. Its conversation must have no unfinished turn, and the whole turn must fit."""
        cache = self.cache
        conv = cache.conversation(request.conversation_id, request.arrival)
        if conv.id in self._open_turns:
            raise ValueError(f"request {request.id}: conversation {conv.id!r} already has an unfinished turn")
        total = conv.tokens + request.prompt_tokens + request.output_tokens
        if total > self.max_context:
            raise ValueError(
                f"request {request.id}: conversation {conv.id!r} would reach {total} tokens, "
                f"over the maximum context of {self.max_context}"
            )
        if -(-total // cache.chunk_tokens) > cache.device.capacity:
            raise ValueError(
                f"request {request.id}: its {total} tokens need {-(-total // cache.chunk_tokens)} chunks "
                f"but the device tier holds only {cache.device.capacity}; enlarge the device cache"
            )
        if request.id in self.requests:
            raise ValueError(f"request id {request.id} is already in use")
        conv.tokens += request.prompt_tokens
        request.conversation = conv
        if self.queue_aware:
            cache.touch(conv, request.arrival)
        self.requests[request.id] = request
        self._open_turns.add(conv.id)
        if self.waiting and _arrival_key(self.waiting[-1]) > _arrival_key(request):
            self._requeue(request)
        else:
            self.waiting.append(request)

    def _requeue(self, request: Request) -> None:
        keys = [_arrival_key(r) for r in self.waiting]
        self.waiting.insert(bisect.bisect(keys, _arrival_key(request)), request)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # ------------------------------------------------------------------ the loop
    def schedule(self, now: float) -> StepPlan:
        """Plan the next step at `now`: one unified batch of decodes and prefills, and its copies.

        1. Running requests whose next token starts a new chunk get a device slot; when none can
           be had, the latest-arrived running request is suspended until one can (§4.3.5).
        2. Waiting turns are admitted first-come first-served while the batch's token and
           request budgets last and the device tier keeps its decode reserve; admitting a turn
           restores its conversation's chunks (swap-ins, recomputation of dropped ones).
        3. Chunks are copied to the host ahead of time when the device tier runs low.

        The plan must be passed to `complete` (with the backend's result) before the next call,
        unless it has no tokens to run.
        """
        cache = self.cache
        if self._planned is not None:
            raise RuntimeError(f"step {self._planned} was planned but not completed; call complete() first")
        cache.begin_step()
        suspended: list[int] = []
        prefills: list[PrefillItem] = self._admit(now, 0) if self.prefill_first and self.waiting else []
        if prefills:  # a prompt step: the running batch waits for the next one
            decodes, context = [], 0
        else:
            ticks = self.clock.ticks
            self._grow_decodes(ticks, now, suspended)
            decodes = self._running_ids.copy()
            # Each decode's context is its kv_tokens plus the token itself.
            context = self._kv_base + len(decodes) * (ticks + 1)
            if not self.prefill_first:
                prefills = self._admit(now, len(decodes))

        urgent = len(cache.swap_out_ops)  # reclaimed for this step's chunks: their slots are refilled
        if decodes or prefills:  # an empty plan may be dropped (below): it must carry no copies
            cache.swap_out_ahead(now, self.swap_out_threshold)
        self.steps += 1
        plan = StepPlan(self.steps, decodes, context, prefills, cache.swap_out_ops, cache.swap_in_ops,
                        cache.dropped_this_step, suspended, len(cache.swap_out_ops) - urgent)
        # A plan with tokens must be completed before the next; an empty one (nothing to run)
        # may simply be dropped by a driver that waits for work.
        self._planned = plan.index if decodes or prefills else None
        return plan

    def _admit(self, now: float, batch_tokens: int) -> list[PrefillItem]:
        """Admit waiting turns first-come first-served into a batch already holding `batch_tokens` tokens,
        while its token and request budgets last and the device tier keeps its decode reserve; each
        admitted turn's conversation is restored (swap-ins, recomputation of dropped chunks)."""
        cache = self.cache
        running, ids = self.running, self._running_ids
        prefills: list[PrefillItem] = []
        waiting = self.waiting
        if waiting:
            ct = cache.chunk_tokens
            admit_limit = (1 - self.decode_reserve) * cache.device.capacity
        while waiting and len(running) < self.max_batch_requests:
            r = waiting[0]
            conv = r.conversation
            query = self._query_tokens(conv)
            busy = bool(running)
            if busy and batch_tokens + query > self.max_batch_tokens:
                break
            total_slots = -(-conv.tokens // ct)
            # Admit only while the decode reserve stays free; with nothing running, a request
            # that fits the whole tier runs alone rather than waiting forever.
            if busy and cache.active_slots + total_slots > admit_limit:
                break
            restore = cache.acquire(conv, now)
            if restore is None:
                break
            waiting.popleft()
            if r.admitted is None:
                r.admitted = now
                r.history_tokens = conv.kv_tokens
                r.gpu_hit_tokens = restore.gpu_hit_tokens
                r.cpu_hit_tokens = restore.cpu_hit_tokens
                r.recomputed_tokens = restore.recomputed_tokens
                r.new_prompt_tokens = restore.new_tokens
            else:
                r.resume_recomputed_tokens += restore.recomputed_tokens
            r.swap_in_chunks += restore.swap_in_chunks
            if running and _arrival_key(running[-1]) > _arrival_key(r):
                i = bisect.bisect(running, _arrival_key(r), key=_arrival_key)
                running.insert(i, r)
                ids.insert(i, r.id)
            else:
                running.append(r)
                ids.append(r.id)
            prefills.append(PrefillItem(r.id, conv.id, restore.spans, conv.tokens))
            batch_tokens += query
        return prefills

    def complete(self, plan: StepPlan, result: StepResult | None, now: float) -> list[Request]:
        """Apply the latest plan's outcome: one new token per request, finished turns released."""
        if plan.index != self._planned and not (plan.empty and plan.index == self.steps):
            raise RuntimeError(f"complete() got step {plan.index}'s plan, but the step awaiting completion is "
                               f"{self._planned}")
        self._planned = None
        requests = self.requests
        stopped = result.stopped if result is not None else ()
        clock = self.clock
        finished: list[Request] = []
        # Every decode of the plan has its token: their counters follow the clock. A plan without decodes
        # (a prompt step, or nothing was running) moves no counter.
        due = None
        if plan.decodes:
            clock.ticks += 1
            due = self._finish_due.pop(clock.ticks, None)
        if due:
            # A turn suspended and resumed with no decode step between is due at the same reading twice.
            finished = list(dict.fromkeys(r for r in due if r.finish_at == clock.ticks))
            if len(finished) > 1:
                finished.sort(key=_arrival_key)  # released in running order, as they decoded
        for item in plan.prefills:
            r = requests[item.request_id]
            conv = r.conversation
            conv.kv_tokens = conv.tokens
            conv.tokens += 1
            r.generated += 1
            if r.first_token is None:
                r.first_token = now
            if r.generated >= r.output_tokens:
                finished.append(r)
            else:
                self._start_decoding(r, conv)
        for rid in stopped:
            r = requests[rid]
            if r.generated < r.output_tokens:
                r.stopped_early = True
                finished.append(r)
        if finished:
            running, ids = self.running, self._running_ids
            for r in finished:
                self._stop_decoding(r)
                r.finish = now
                self.cache.release(r.conversation, now)
                del requests[r.id]
                self._open_turns.discard(r.conversation_id)
                self.finished.append(r)
                i = running.index(r)
                del running[i]
                del ids[i]
        self.cache.end_step()
        return finished

    # ------------------------------------------------------------------ helpers
    def _start_decoding(self, r: Request, conv) -> None:
        """`r` decodes from the next step on: its counters follow the clock, its due steps are set."""
        clock = self.clock
        ticks = clock.ticks
        conv.follow(clock)
        r.follow(clock)
        self._kv_base += conv.kv_tokens - ticks
        r.finish_at = ticks + r.output_tokens - r.generated
        due = self._finish_due.get(r.finish_at)
        if due is None:
            due = self._finish_due[r.finish_at] = []
            heapq.heappush(self._finish_keys, r.finish_at)
        due.append(r)
        self._plan_grow(r, conv, ticks)

    def _grow_decodes(self, ticks: int, now: float, suspended: list[int] | None) -> None:
        """Give a device slot to every running request whose next token starts a new chunk at clock
        reading `ticks`, in running order (`schedule` and `take_plain_steps` share this).

        The slots are taken in one go while there is room. When a decode cannot get one, the
        latest-arrived running request is suspended until it can (its chunks become evictable);
        the suspended ids are appended to `suspended`. Plain steps pass None: they were offered
        only with room for every due decode.
        """
        due = self._grow_due.pop(ticks, None)
        if not due:
            return
        if len(due) > 1:
            due.sort(key=_arrival_key)
        # Others are stale (finished, suspended, re-planned); one suspended and resumed with no decode step
        # between is listed twice.
        due = list(dict.fromkeys(r for r in due if r.grow_at == ticks))
        cache = self.cache
        grown = cache.grow_all([r.conversation for r in due], now)
        for r in due[:grown]:
            self._plan_grow(r, r.conversation, ticks)
        if grown == len(due):
            return
        assert suspended is not None, "plain_steps checked the room"
        running, ids = self.running, self._running_ids
        for r in due[grown:]:
            if r.grow_at != ticks:
                continue  # suspended to make room for an earlier one
            while not cache.grow(r.conversation, now):
                victim = running.pop()  # the latest arrival gives way
                ids.pop()
                self._suspend(victim, now)
                suspended.append(victim.id)
                if victim is r:
                    break
            else:
                self._plan_grow(r, r.conversation, ticks)

    def _plan_grow(self, r: Request, conv, ticks: int) -> None:
        """Note the clock reading at which `r`'s next token starts a new chunk, if its turn lasts that long."""
        at = ticks + max(0, len(conv.dev) * self.cache.chunk_tokens - conv.kv_tokens)
        if at < r.finish_at:
            r.grow_at = at
            due = self._grow_due.get(at)
            if due is None:
                due = self._grow_due[at] = []
                heapq.heappush(self._grow_keys, at)
            due.append(r)
        else:
            r.grow_at = -1

    def _stop_decoding(self, r: Request) -> None:
        """`r` leaves the batch: its counters stop where they are (due entries left behind go stale)."""
        if r.decoding:
            conv = r.conversation
            self._kv_base -= conv.kv_tokens - self.clock.ticks
            conv.follow(STILL)
            r.follow(STILL)
        r.grow_at = r.finish_at = -1

    def _suspend(self, request: Request, now: float) -> None:
        """Take a running request out of the batch; its chunks become evictable; it re-queues."""
        self._stop_decoding(request)
        request.suspensions += 1
        self.suspensions += 1
        self.cache.release(request.conversation, now)
        self._requeue(request)

    def _query_tokens(self, conv) -> int:
        """Tokens admitting `conv` computes: its dropped chunks' tokens plus its pending tokens."""
        cache = self.cache
        kv = conv.kv_tokens
        dropped = computed_tokens(cache.order.indices(conv.chunks, 0, conv.drop_end), cache.chunk_tokens, kv)
        return dropped + conv.tokens - kv

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Recount the scheduler's books and the cache's from scratch (tests); AssertionError if off."""
        self.cache.check_invariants()
        ct = self.cache.chunk_tokens
        ticks = self.clock.ticks
        assert self._running_ids == [r.id for r in self.running]
        assert [_arrival_key(r) for r in self.running] == sorted(_arrival_key(r) for r in self.running)
        decoding = [r for r in self.running if r.decoding]
        if self._planned is None:
            assert len(decoding) == len(self.running), "between steps every running request decodes"
        assert self._kv_base == sum(r.conversation.kv_tokens - ticks for r in decoding)
        for r in decoding:
            conv = r.conversation
            assert conv.tokens == conv.kv_tokens + 1
            assert r.finish_at == ticks + r.output_tokens - r.generated > ticks
            assert r in self._finish_due[r.finish_at]
            grow_at = ticks + max(0, conv.chunks * ct - conv.kv_tokens)
            if r.grow_at >= 0:
                assert r.grow_at == grow_at and r in self._grow_due[grow_at], (r, r.grow_at, grow_at)
            else:
                assert grow_at >= r.finish_at, (r, grow_at, r.finish_at)
