"""Iteration-level unified batching over the cache manager (§4.2, §4.3.5).

Every step: running requests decode one token each; requests that cannot get a slot for their
next token suspend the latest-arrived running request (its chunks become evictable and it
re-queues in arrival order); then waiting requests are admitted first-come first-served while
the batch has token and request room and the device tier keeps its decode reserve; finally
chunks are swapped out ahead of time when the device tier runs low.
"""
from __future__ import annotations

import bisect
from collections import deque

from .cache import KVCacheManager
from .plan import PrefillItem, StepPlan, StepResult
from .request import Request


def _arrival_key(request: Request) -> tuple[float, int]:
    return (request.arrival, request.id)


class Scheduler:
    """Owns the waiting queue, the running batch and its budgets; the core's loop is
    `plan = schedule(now)`, a backend executes it, `complete(plan, result, now)`."""

    def __init__(self, cache: KVCacheManager, max_batch_tokens: int = 2048, max_batch_requests: int = 256,
                 decode_reserve: float = 0.10, swap_out_threshold: float = 0.25, max_context: int = 16384) -> None:
        if max_batch_tokens < 1 or max_batch_requests < 1:
            raise ValueError("max_batch_tokens and max_batch_requests must be >= 1")
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
        self._decoding: list[Request] = []  # the decodes of the latest plan, as objects
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
        cache = self.cache
        cache.begin_step()
        ct = cache.chunk_tokens
        running = self.running
        suspended: list[int] = []
        # The common case in one tight pass: every decode already has a slot for its token,
        # or gets one. A decode that cannot sends the rest through the suspending loop below.
        context = 0
        stuck = -1
        for i, r in enumerate(running):
            conv = r.conversation
            kv = conv.kv_tokens
            if kv >= len(conv.dev) * ct and not cache.grow(conv, now):
                stuck = i
                break
            context += kv
        if stuck >= 0:
            i = stuck
            while i < len(running):
                r = running[i]
                conv = r.conversation
                if conv.kv_tokens >= len(conv.dev) * ct and not cache.grow(conv, now):
                    victim = running.pop()  # the latest arrival gives way (§4.3.5)
                    self._suspend(victim, now)
                    suspended.append(victim.id)
                    continue  # retry r, unless it was the victim
                context += conv.kv_tokens
                i += 1
        self._decoding = list(running)
        decodes = [r.id for r in running]
        context += len(decodes)

        prefills: list[PrefillItem] = []
        batch_tokens = len(decodes)
        admit_limit = (1 - self.decode_reserve) * cache.device.capacity
        waiting = self.waiting
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
                bisect.insort(running, r, key=_arrival_key)
            else:
                running.append(r)
            prefills.append(PrefillItem(r.id, conv.id, restore.spans, conv.tokens))
            batch_tokens += query

        cache.swap_out_ahead(now, self.swap_out_threshold)
        self.steps += 1
        return StepPlan(self.steps, decodes, context, prefills, cache.swap_out_ops, cache.swap_in_ops,
                        cache.dropped_this_step, suspended)

    def complete(self, plan: StepPlan, result: StepResult | None, now: float) -> list[Request]:
        """Apply a step's outcome: one new token per request, finished turns released."""
        requests = self.requests
        stopped = result.stopped if result is not None else ()
        finished: list[Request] = []
        decoding = self._decoding if plan.index == self.steps else [requests[rid] for rid in plan.decodes]
        for r in decoding:
            conv = r.conversation
            conv.kv_tokens += 1
            conv.tokens += 1
            r.generated += 1
            if r.generated >= r.output_tokens:
                finished.append(r)
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
        for rid in stopped:
            r = requests[rid]
            if r.generated < r.output_tokens:
                r.stopped_early = True
                finished.append(r)
        if finished:
            for r in finished:
                r.finish = now
                self.cache.release(r.conversation, now)
                del requests[r.id]
                self._open_turns.discard(r.conversation_id)
                self.finished.append(r)
            self.running = [r for r in self.running if r.finish is None]
        self.cache.end_step()
        return finished

    # ------------------------------------------------------------------ helpers
    def _suspend(self, request: Request, now: float) -> None:
        """Take a running request out of the batch; its chunks become evictable; it re-queues."""
        request.suspensions += 1
        self.suspensions += 1
        self.cache.release(request.conversation, now)
        self._requeue(request)

    def _query_tokens(self, conv) -> int:
        """Tokens admitting `conv` computes: its dropped chunks' tokens plus its pending tokens."""
        ct = self.cache.chunk_tokens
        dropped = conv.d * ct
        if conv.d and not self.cache.trailing:
            # the last chunk may be partial only if every chunk is dropped
            dropped = min(dropped, conv.kv_tokens)
        elif conv.d:
            dropped = conv.kv_tokens - (conv.chunks - conv.d) * ct
        return dropped + conv.tokens - conv.kv_tokens
