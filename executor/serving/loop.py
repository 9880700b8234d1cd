"""The engine on its own thread, fed by HTTP handlers: one loop, requests joining and leaving at step boundaries.

Handlers on the event loop never touch the engine. They `submit` a `Job` and read its events
(text deltas, then the end) from the callback they gave; everything else (routing a request to its
conversation, truncating a departed history, adding, cancelling, stepping) happens on the engine
thread, between steps, so the core only ever sees whole steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

from executor.cpu import ThreadGovernor, fixed_threads, torch_threads, tune_allocator
from executor.engine import Engine, Sampling
from executor.serving.detokenize import IncrementalText
from executor.serving.metrics import ServingMetrics
from executor.serving.routing import ConversationRouter

log = logging.getLogger("pensieve.serve")
# A step's events reach the HTTP handlers in one batch after the step, and the next step waits (at most
# DELIVERY_WAIT_S) until the event loop has written them: torch's threads then compute without the
# event loop taking the GIL or a core from them mid-step. On a 2-core machine, interleaving the two
# made each step about 20% slower.
BATCH_QUIET_S = 0.005  # an idle engine starts once no request has arrived for this long (within its window)
DELIVERY_HOPS = 3
DELIVERY_WAIT_S = 0.02


@dataclass
class Delta:
    """New text of a request, and the token ids that produced it."""

    text: str
    token_ids: list[int]


@dataclass
class Done:
    """The request ended: why (`stop`, `length`, `abort`) and what it used."""

    finish_reason: str
    usage: dict


@dataclass
class Failed:
    """The request could not be served: an HTTP status and a message for the client."""

    status: int
    message: str
    param: str | None = None


Event = Delta | Done | Failed


class Sink(Protocol):
    """Where a job's events go: an asyncio queue read by its HTTP handler."""

    loop: asyncio.AbstractEventLoop

    def emit(self, event: Event) -> None:
        """From any thread."""

    def put(self, event: Event) -> None:
        """On `loop`'s thread."""


@dataclass
class Job:
    """One API request as the engine thread serves it."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    sink: Sink
    text: IncrementalText
    ignore_eos: bool = False
    session: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    # Filled in on the engine thread.
    request_id: int | None = None
    conversation_id: Hashable | None = None
    token_ids: list[int] = field(default_factory=list)
    cancelled: bool = False

    def emit(self, event: Event) -> None:
        self.sink.emit(event)


def _deliver(items: list[tuple[Sink, Event]], done: threading.Event, hops: int = DELIVERY_HOPS) -> None:
    """On the event loop: hand a step's events to their handlers, then signal the engine thread once the
    loop has run the handlers' few steps each (every hop goes to the back of the ready queue)."""
    for sink, event in items:
        sink.put(event)
    if hops:
        asyncio.get_running_loop().call_soon(_deliver, [], done, hops - 1)
    else:
        done.set()


class EngineLoop:
    """Serves `Job`s on `engine` from one thread; `submit` and `cancel` may be called from any thread.

    `pensieve serve` runs it on the main thread (`run`) and HTTP on another: torch's OpenMP threads
    run small matrix products about 40% slower under a thread other than the main one on this
    machine (measured: 16x576 by 576x1536, 243 against 340 us), which made every decode step of
    SmolLM2 ~25% slower. `start` runs it on a thread of its own (tests, embedding).
    """

    def __init__(self, engine: Engine, router: ConversationRouter, metrics: ServingMetrics | None = None,
                 threads: int | None = None, batch_window_s: float = 0.02) -> None:
        """`batch_window_s`: how long an idle engine may wait for more requests after one arrives (0: none)."""
        if batch_window_s < 0:
            raise ValueError(f"the batching window must be >= 0 seconds, got {batch_window_s}")
        self.batch_window_s = batch_window_s
        self.engine = engine
        self.router = router
        self.metrics = metrics
        self.threads = threads
        self.failure: BaseException | None = None  # what stopped the loop, if a step raised
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}  # request id -> job, while in the engine
        self._parked: dict[Hashable, deque[Job]] = defaultdict(deque)  # waiting for their session's turn
        self._thread: threading.Thread | None = None
        self._running = threading.Event()
        self._ended = threading.Event()
        self._stopping = False
        self._outbox: list[tuple[Sink, Event]] = []  # this step's events, delivered after it
        self.served = 0  # requests finished

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        """Serve on a new thread."""
        self._thread = threading.Thread(target=self.run, name="pensieve-engine", daemon=True)
        self._thread.start()
        self._running.wait()

    @property
    def alive(self) -> bool:
        return self._running.is_set() and not self._ended.is_set() and self.failure is None

    def submit(self, job: Job) -> None:
        self._inbox.put(("submit", job))

    def cancel(self, job: Job) -> None:
        self._inbox.put(("cancel", job))

    def cancel_all(self) -> None:
        """Cancel every request in flight or queued (shutdown); each ends at its next token."""
        self._inbox.put(("cancel_all", None))

    def stop(self, timeout: float | None = 30.0) -> None:
        """Cancel what is in flight, let each request end at its next token, then end `run`."""
        self._inbox.put(("stop", None))
        if self._running.is_set():
            self._ended.wait(timeout)

    def call(self, fn: Callable[[Engine], object], timeout: float = 30.0) -> object:
        """Run `fn(engine)` on the engine thread between steps and return its result (tests' checks)."""
        box: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox.put(("call", (fn, box)))
        ok, value = box.get(timeout=timeout)
        if not ok:
            raise value
        return value

    # ------------------------------------------------------------------ the engine thread
    def run(self) -> None:
        """Serve until `stop`, on the calling thread."""
        try:
            self._run()
        finally:
            self._ended.set()

    def _run(self) -> None:
        engine = self.engine
        governor = None
        if engine.loaded.device.type == "cpu":
            tune_allocator()
            if self.threads is None:
                self.threads = fixed_threads(engine.loaded.dims)
                governor = ThreadGovernor() if self.threads is None else None
        with torch_threads(self.threads):
            if governor is not None:
                governor.start(probe_s=0.05)
            self._running.set()
            try:
                self._serve(governor)
            except BaseException as exc:  # a bug in a step: every waiting client gets an answer
                self.failure = exc
                log.exception("the engine loop stopped")
                for job in [*self._jobs.values(), *(j for jobs in self._parked.values() for j in jobs)]:
                    job.emit(Failed(500, f"the engine failed: {exc!r}"))
                self._jobs.clear()
                self._parked.clear()
                self._fail_inbox(exc)

    def _fail_inbox(self, exc: BaseException) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                item.emit(Failed(503, f"the engine has stopped: {exc!r}"))
            elif kind == "call":
                item[1].put((False, RuntimeError("the engine has stopped")))

    def _serve(self, governor: ThreadGovernor | None) -> None:
        engine = self.engine
        while True:
            idle = engine.scheduler.idle
            if self._stopping and idle:
                return
            self._take_inbox(block=idle)
            if engine.scheduler.idle:
                continue
            if idle and governor is not None:
                governor.resume()
            now = time.perf_counter()
            cache = engine.cache
            swapped = cache.stats.swap_in_chunks, cache.stats.swap_out_chunks
            plan, finished = engine.step(now)
            if governor is not None:
                governor.step_done()
            if self.metrics is not None:
                self.metrics.step_done(engine, plan, swapped)
            for request in finished:
                self._finish(request)
            engine.scheduler.finished.clear()  # a server keeps nothing per finished request
            self._deliver_step()

    def _on_token(self, job: Job, token: int) -> bool:
        """The engine's stop check for `job`: follow its text; True when a stop string is complete."""
        job.token_ids.append(token)
        self._outbox.append((job.sink, Delta(job.text.add(token), [token])))
        return job.text.stopped

    def _deliver_step(self) -> None:
        """Hand this step's events to the event loops of their handlers, and wait until they are written."""
        if not self._outbox:
            return
        batches: dict[asyncio.AbstractEventLoop, list[tuple[Sink, Event]]] = defaultdict(list)
        for sink, event in self._outbox:
            batches[sink.loop].append((sink, event))
        self._outbox = []
        waits = []
        for loop, items in batches.items():
            done = threading.Event()
            try:
                loop.call_soon_threadsafe(_deliver, items, done, DELIVERY_HOPS if DELIVERY_WAIT_S else 0)
            except RuntimeError:  # that event loop has closed: nobody listens
                continue
            waits.append(done)
        if DELIVERY_WAIT_S:
            for done in waits:
                done.wait(DELIVERY_WAIT_S)

    def _take_inbox(self, block: bool) -> None:
        """Everything handlers sent since the last step; waits for the first when the engine is idle."""
        items = [self._inbox.get()] if block else []
        if items and items[0][0] == "submit" and self.batch_window_s > 0:
            # The engine was idle: requests sent together (clients answered in the same step) reach
            # it a few ms apart over HTTP, and a step cannot take one that arrives while it runs.
            # Collect while they keep coming, so they start in one step as `pensieve run` starts them.
            deadline = time.perf_counter() + self.batch_window_s
            quiet = min(self.batch_window_s, BATCH_QUIET_S)
            while (left := deadline - time.perf_counter()) > 0:
                try:
                    items.append(self._inbox.get(timeout=min(left, quiet)))
                except queue.Empty:
                    break
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for kind, item in items:
            if kind == "submit":
                if self._stopping:
                    item.emit(Failed(503, "the server is shutting down"))
                else:
                    self._admit(item)
            elif kind == "cancel":
                self._cancel(item)
            elif kind == "call":
                fn, box = item
                try:
                    box.put((True, fn(self.engine)))
                except Exception as exc:  # handed back to the caller
                    box.put((False, exc))
            elif kind in ("stop", "cancel_all"):
                self._stopping = self._stopping or kind == "stop"
                for job in list(self._jobs.values()) + [j for jobs in self._parked.values() for j in jobs]:
                    self._cancel(job)

    def _admit(self, job: Job) -> None:
        """Route a job to its conversation and hand it to the engine (or park it behind its session's turn)."""
        engine = self.engine
        route = self.router.route(job.prompt_ids, job.session)
        if route is None:  # its session has a turn in flight: it goes after that turn
            self._parked[self.router.session_conversation(job.session)].append(job)
            return
        job.conversation_id = cid = route.conversation_id
        history = len(engine.conversation_ids(cid))
        if route.keep < history:
            engine.truncate_conversation(cid, route.keep)
            if self.metrics is not None:
                self.metrics.departed_tokens.inc(history - route.keep)
        try:
            request = engine.add_request(
                cid, job.prompt_ids[route.keep:], job.max_tokens, arrival=job.arrival,
                stop_at_eos=not job.ignore_eos, sampling=job.sampling,
                stop_check=lambda token, job=job: self._on_token(job, token))
        except ValueError as exc:  # the turn does not fit the context or the device tier
            self._release(cid)
            job.emit(Failed(400, str(exc), "messages"))
            return
        job.request_id = request.id
        self._jobs[request.id] = job

    def _cancel(self, job: Job) -> None:
        job.cancelled = True
        if job.request_id is not None and job.request_id in self._jobs:
            self.engine.cancel(job.request_id)
            return
        for jobs in self._parked.values():  # not started: it simply leaves
            if job in jobs:
                jobs.remove(job)
                job.emit(Done("abort", self._usage(job, None)))

    def _finish(self, request) -> None:
        job = self._jobs.pop(request.id)
        tail = job.text.finish()
        if tail:
            self._outbox.append((job.sink, Delta(tail, [])))
        if job.text.stopped:
            reason = "stop"  # a stop string
        elif job.cancelled and request.stopped_early:
            reason = "abort"
        elif request.stopped_early:
            reason = "stop"  # EOS
        else:
            reason = "length"
        usage = self._usage(job, request)
        if self.metrics is not None:
            self.metrics.request_done(request, reason, len(job.prompt_ids))
        self._outbox.append((job.sink, Done(reason, usage)))
        self.served += 1
        self.engine.forget_request(request.id)
        self._release(job.conversation_id)

    def _release(self, conversation_id: Hashable) -> None:
        """The conversation is idle again: index it, forget the oldest beyond the limit, start a parked job."""
        engine = self.engine
        for old in self.router.finished(conversation_id, engine.conversation_ids(conversation_id)):
            engine.end_conversation(old)
        parked = self._parked.get(conversation_id)
        if parked:
            job = parked.popleft()
            if not parked:
                del self._parked[conversation_id]
            self._admit(job)

    @staticmethod
    def _usage(job: Job, request) -> dict:
        prompt = len(job.prompt_ids)
        generated = len(job.token_ids)
        if request is None:
            device = host = recomputed = history = 0
        else:
            device, host = request.gpu_hit_tokens, request.cpu_hit_tokens
            recomputed, history = request.recomputed_tokens, request.history_tokens
        return {
            "prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": device + host},
            # This server's own detail (clients that do not know it ignore it): where the kept
            # history's KV was found, and which conversation the request continued.
            "pensieve": {"history_tokens": history, "device_hit_tokens": device, "host_hit_tokens": host,
                         "recomputed_tokens": recomputed, "conversation": str(job.conversation_id)},
        }
