"""Benchmark of the core alone: how long one `schedule` + `complete` takes under cache pressure.

The simulator calls the core once per iteration, so this bounds the simulator's speed.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

from .backends import BookkeepingBackend
from .config import SchedulerConfig
from .core import build_core
from .cost import LinearCostModel
from .request import Request


@dataclass
class CoreBenchResult:
    policy: str
    device_slots: int
    host_slots: int
    conversations: int
    steps: int
    mean_us_per_step: float
    steps_per_s: float
    decodes_per_step: float
    admitted: int
    swap_out_chunks: int
    swap_in_chunks: int
    dropped_chunks: int
    suspensions: int

    def to_dict(self) -> dict:
        return asdict(self)


def run_core_bench(policy: str = "pensieve", running: int = 128, device_slots: int = 100_000,
                   host_slots: int = 100_000, history_tokens: int = 1024, output_tokens: int = 256,
                   prompt_tokens: int = 64, steps: int = 4000, chunk_tokens: int = 32, spread_s: float = 600.0,
                   seed: int = 0) -> CoreBenchResult:
    """Fill both tiers with idle conversations, then keep `running` decodes going for `steps` steps.

    Each finished turn is replaced by the next turn of a randomly chosen idle conversation, whose
    chunks must be restored (swap-ins, recomputation) while the device tier evicts and swaps out.
    """
    rng = random.Random(seed)
    sched = build_core(policy=policy, cost_model=LinearCostModel(), device_slots=device_slots, host_slots=host_slots,
                       chunk_tokens=chunk_tokens, max_context=16384,
                       scheduler=SchedulerConfig(max_batch_tokens=8192, max_batch_requests=running))
    cache = sched.cache
    backend = BookkeepingBackend()
    chunks_per_conv = -(-history_tokens // chunk_tokens)
    # Enough conversations to overfill both tiers, so evictions happen from the first step on.
    conversations = int(1.2 * (device_slots + host_slots) / chunks_per_conv) + running
    now = 0.0
    next_id = 0

    def add(conv: int, prompt: int, out: int) -> None:
        nonlocal next_id
        sched.add_request(Request(next_id, conv, turn, now, prompt, out))
        next_id += 1

    turn = 0
    # Prefill every conversation's history (one output token), spread over `spread_s` seconds so
    # that idle conversations have the spread of ages a chat service sees (think times of
    # minutes, §6.1), not all the same age.
    for conv in range(conversations):
        now += spread_s / conversations
        add(conv, history_tokens, 1)
        while not sched.idle:
            sched.complete(plan := sched.schedule(now), backend.execute(plan), now)

    turn = 1
    idle = list(range(conversations))
    rng.shuffle(idle)
    for _ in range(running):
        add(idle.pop(), prompt_tokens, rng.randint(output_tokens // 2, output_tokens))
    admitted_before = next_id
    stats_before = (cache.stats.swap_out_chunks, cache.stats.swap_in_chunks, cache.stats.dropped_chunks)
    decodes = 0
    elapsed = 0.0
    clock = time.perf_counter
    for _ in range(steps):
        now += 0.02
        t0 = clock()
        plan = sched.schedule(now)
        result = backend.execute(plan)
        finished = sched.complete(plan, result, now)
        elapsed += clock() - t0
        decodes += len(plan.decodes)
        for r in finished:  # the workload, outside the timed region
            idle.insert(rng.randrange(len(idle) + 1), r.conversation_id)
            add(idle.pop(), prompt_tokens, rng.randint(output_tokens // 2, output_tokens))
    return CoreBenchResult(
        policy=policy, device_slots=device_slots, host_slots=cache.host.capacity, conversations=conversations,
        steps=steps, mean_us_per_step=elapsed / steps * 1e6, steps_per_s=steps / elapsed,
        decodes_per_step=decodes / steps, admitted=next_id - admitted_before,
        swap_out_chunks=cache.stats.swap_out_chunks - stats_before[0],
        swap_in_chunks=cache.stats.swap_in_chunks - stats_before[1],
        dropped_chunks=cache.stats.dropped_chunks - stats_before[2],
        suspensions=sched.suspensions,
    )


def main(args) -> int:
    """`pensieve bench-core`: median of several runs, since this machine's timings are noisy."""
    import statistics

    from tqdm import tqdm

    runs = [
        run_core_bench(policy=args.policy, running=args.running, device_slots=args.device_slots,
                       host_slots=args.host_slots, steps=args.steps, seed=i)
        for i in tqdm(range(args.repeats), desc="bench-core", unit="run")
    ]
    median = statistics.median(r.mean_us_per_step for r in runs)
    if args.json:
        from .results import print_json

        print_json({"median_us_per_step": median, "runs": [r.to_dict() for r in runs]})
        return 0
    last = runs[-1]
    print(f"policy {last.policy}: {last.device_slots} device + {last.host_slots} host chunk slots, "
          f"{last.conversations} conversations, {last.decodes_per_step:.1f} decodes per step")
    print(f"per {last.steps} steps: {last.admitted} turns admitted, {last.swap_out_chunks} chunks swapped out, "
          f"{last.swap_in_chunks} swapped in, {last.dropped_chunks} dropped, {last.suspensions} suspensions")
    print("run  us/step  steps/s")
    for i, r in enumerate(runs):
        print(f"{i:>3}  {r.mean_us_per_step:7.1f}  {r.steps_per_s:7.0f}")
    print(f"median: {median:.1f} us per schedule+complete step ({1e6 / median:.0f} steps/s)")
    return 0
