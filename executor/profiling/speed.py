"""The machine-speed probe validation uses: grid-point steps timed now against the profile's tables."""

from __future__ import annotations

import statistics

from executor.models import LoadedModel
from executor.profiling.check import CHECK_SEED, CheckBatch, lay_out, check_plan, anchor_batches
from executor.profiling.harness import Bench
from pensieve.profile import Profile, ProfileCostModel


def speed_anchors(profile: Profile) -> list[CheckBatch]:
    """The prefill grid points of `anchor_batches` and a single decode at a mid-grid context: the step kinds
    a serving run is made of, each a point whose prediction is (almost) a table value."""
    kv = sorted(profile.tables["decode_attention_s"][1])
    return anchor_batches(profile) + [CheckBatch(f"grid point 1 decode @ {kv[len(kv) // 2]}", [], [kv[len(kv) // 2]])]


def machine_speed(profile: Profile, loaded: LoadedModel, repeats: int = 5) -> dict:
    """How fast this machine runs now against the profile: measured over predicted time of grid-point steps.

    A shared or virtual machine changes speed from minute to minute (other tenants, clocks), so a
    comparison with a profile taken earlier mixes that drift with the cost model's own error. Measured
    just before and after a run, this separates them. It reads nothing of the run itself.
    """
    chunk = profile.chunk_tokens
    batches = speed_anchors(profile)
    slots = max(sum(-(-c // chunk) for c in b.decodes) + sum(-(-c // chunk) for _, c in b.prefills) for b in batches)
    bench = Bench(loaded, chunk, slots, 2, seed=CHECK_SEED)
    cost = ProfileCostModel(profile)
    ratios = {}
    for i, batch in enumerate(batches):
        seqs, _, _ = lay_out(batch, bench, 2)
        bench.step(seqs, [], [])  # warm-up
        measured = statistics.median(bench.step(seqs, [], []) for _ in range(repeats))
        ratios[batch.label] = measured / cost.step_time_s(check_plan(i, batch, [], []), chunk)
    return {"factor": float(statistics.median(ratios.values())), "points": ratios}
