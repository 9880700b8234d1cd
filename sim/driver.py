"""The SimPy driver: conversations as processes, one server process running the core's loop.

The server does exactly what the real executor's loop does (`schedule`, execute, `complete`)
with the same scheduler, cache and policy objects; only the step's duration comes from the
cost model instead of a device.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import simpy
from tqdm import tqdm

from pensieve.config import Scenario
from pensieve.cost import CostModel
from pensieve.core import build_scheduler
from pensieve.request import Request
from pensieve.results import summarize
from pensieve.scheduler import Scheduler
from pensieve.workload import Conversation, Workload

# Cache occupancy is sampled this often (simulated seconds) for the occupancy plot.
TIMELINE_EVERY_S = 1.0


@dataclass
class SimRun:
    summary: dict
    finished: list[Request]
    timeline: list[dict] = field(default_factory=list)
    interrupted: bool = False


class _Server:
    """Runs the core's loop on simulated time; wakes when a turn arrives while it is idle."""

    def __init__(self, env: simpy.Environment, sched: Scheduler, cost: CostModel, progress,
                 chain_steps: bool = True) -> None:
        self.env = env
        self.chain_steps = chain_steps
        self.sched = sched
        self.cost = cost
        self.progress = progress
        self.wake = env.event()
        self.done_events: dict[int, simpy.Event] = {}
        self.timeline: list[dict] = []
        self._next_sample = 0.0
        self.steps = 0

    def submit(self, request: Request) -> simpy.Event:
        self.sched.add_request(request)
        done = self.done_events[request.id] = self.env.event()
        if not self.wake.triggered:
            self.wake.succeed()
        return done

    def run(self):
        env, sched, cost = self.env, self.sched, self.cost
        chunk_tokens = sched.cache.chunk_tokens
        while True:
            # A step that finishes no request and ends before any other process's next event (and
            # before the next occupancy sample) is followed at once by the next, without a SimPy
            # event of its own: nothing else can see or change anything in between. The times are
            # the same sums one timeout per step would make (the checks on `start + (t - start)`
            # keep the final timeout's sum exact), so the results are identical; only the event
            # loop's per-step overhead goes, and most steps of a long run are such steps.
            start = env.now
            horizon = min(env.peek(), self._next_sample) if self.chain_steps else start
            end = self._plain_steps(start, start, horizon)
            if sched.idle:  # as the real serving loop: the core is not asked to plan with nothing to run
                self.wake = env.event()
                yield self.wake
                continue
            plan = sched.schedule(end)
            if plan.empty:
                assert end == start, "plain steps never end the last running turn"
                self.wake = env.event()
                yield self.wake
                continue
            end += cost.step_time_s(plan, chunk_tokens)
            if not self.chain_steps:
                horizon = end
            while end < horizon and start + (end - start) == end and not sched.completion_finishes(plan):
                sched.complete(plan, None, end)
                self.steps += 1
                end = self._plain_steps(start, end, horizon)
                plan = sched.schedule(end)
                end += cost.step_time_s(plan, chunk_tokens)
            yield env.timeout(end - start)
            finished = sched.complete(plan, None, env.now)
            self.steps += 1
            for r in finished:
                self.done_events.pop(r.id).succeed()
            if finished:
                self.progress.update(len(finished))
            if env.now >= self._next_sample:
                self._sample()

    def _plain_steps(self, start: float, end: float, horizon: float) -> float:
        """Carry out the plain decode steps ahead (see Scheduler.plain_steps) that end before
        `horizon`, timed from their counts alone: the core skips planning them. Returns the time the
        last one ends."""
        sched, cost = self.sched, self.cost
        chunk_tokens = sched.cache.chunk_tokens
        while True:
            ahead = sched.plain_steps()
            if ahead is None:
                return end
            decodes, context, count = ahead
            first, done = end, 0
            while done < count:
                after = end + cost.decode_step_s(decodes, context, chunk_tokens)
                if not (after < horizon and start + (after - start) == after):
                    break
                end = after
                context += decodes
                done += 1
            sched.take_plain_steps(done, first)
            self.steps += done
            if done < count:
                return end

    def _sample(self) -> None:
        cache = self.sched.cache
        self.timeline.append({
            "time_s": self.env.now, "device_used": cache.device.used, "device_capacity": cache.device.capacity,
            "host_used": cache.host.used, "host_capacity": cache.host.capacity,
            "running": len(self.sched.running), "waiting": len(self.sched.waiting),
        })
        self._next_sample = self.env.now + TIMELINE_EVERY_S


def _conversation(env: simpy.Environment, server: _Server, conv: Conversation, ids, send_at=None):
    """A user: sends a turn, waits for the whole answer, thinks, sends the next. With `send_at`
    ((conversation, turn) -> seconds), each turn is sent at that time instead (open loop), or as
    soon as the previous answer is whole if that comes later (a conversation has one turn open)."""
    yield env.timeout(conv.start_s if send_at is None else send_at[(conv.id, 0)])
    for i, turn in enumerate(conv.turns):
        if send_at is not None:
            if i and send_at[(conv.id, i)] > env.now:
                yield env.timeout(send_at[(conv.id, i)] - env.now)
        elif i and turn.think_s:
            yield env.timeout(turn.think_s)
        request = Request(next(ids), conv.id, i, env.now, turn.prompt_tokens, turn.output_tokens)
        yield server.submit(request)


def simulate(scenario: Scenario, workload: Workload, cost: CostModel, progress: bool = True,
             until_s: float = math.inf, chain_steps: bool = True, send_at: dict | None = None) -> SimRun:
    """Replay `workload` through the scenario's core on simulated time. Ctrl-C keeps what finished.

    `chain_steps=False` gives every step its own SimPy event: slower, with the same results (a test
    holds the fast path to that). `send_at` ((conversation, turn) -> seconds, every turn of the
    workload) sends turns at given times (open loop: a real run's send times) rather than a think
    time after the simulated answer (closed loop).
    """
    if send_at is not None:
        missing = [(c.id, i) for c in workload.conversations for i in range(len(c.turns)) if (c.id, i) not in send_at]
        if missing:
            raise ValueError(f"send_at has no time for {len(missing)} turns, e.g. {missing[0]}")
    sched = build_scheduler(scenario, cost)
    env = simpy.Environment()
    bar = tqdm(total=workload.requests, desc=f"simulate {scenario.cache.policy.type}", unit="req",
               disable=not progress, mininterval=0.5)
    server = _Server(env, sched, cost, bar, chain_steps)
    ids = iter(range(10**12))
    for conv in workload.conversations:
        env.process(_conversation(env, server, conv, ids, send_at))
    env.process(server.run())
    wall = time.perf_counter()
    interrupted = False
    try:
        env.run(until=None if math.isinf(until_s) else until_s)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    wall = time.perf_counter() - wall
    cache = sched.cache
    summary = summarize(
        sched.finished, "sim", cache.policy.name, wall, cache.stats.swap_in_chunks, cache.stats.swap_out_chunks,
        cache.bytes_per_chunk,
        extra={"steps": server.steps, "dropped_chunks": cache.stats.dropped_chunks,
               "device_slots": cache.device.capacity, "host_slots": cache.host.capacity,
               "interrupted": interrupted, "unfinished": workload.requests - len(sched.finished)},
    )
    return SimRun(summary, sched.finished, server.timeline, interrupted)
