"""Throughput at a latency target per sweep variant and seed, and the tables of each variant against a baseline:
throughput at the target (a search), or every metric at each fixed sweep point (a plain sweep with seeds)."""
from __future__ import annotations

from pensieve.config import REPLICATION_AXIS
from pensieve.plots import LOAD_AXIS
from pensieve.stats import CONFIDENCE, Estimate, estimate, paired_ratio

from .sweep import throughput_at_target, worker_pool


def describe_search(found: dict) -> str:
    """One line of a variant's search: throughput at the target, with its interval over seeds."""
    per_seed = found["per_seed"]
    passed = [b for b in per_seed.values() if b]
    if not passed:
        return "target not met"
    rps = found["throughput_rps"]
    text = f"{Estimate(rps['mean'], rps['half_width'], rps['n']).format(4)} req/s"
    if len(per_seed) == 1:
        text += f" at arrival rate {passed[0]['arrival_rate']:.4g}/s"
    else:
        text += f" over {len(per_seed)} seeds (target not met under {len(per_seed) - len(passed)})" \
            if len(passed) < len(per_seed) else f" over {len(per_seed)} seeds"
    return text


BASELINE_COLUMNS = [("policy", "policy"), ("seeds", "seeds"), ("req/s at target", "throughput"),
                    ("x baseline", "ratio"), ("difference", "verdict"), ("recomputed", "recomputed_fraction"),
                    ("ttft p90 s", "ttft_p90_s")]


def baseline_table(results: dict, baseline: str) -> list[dict]:
    """Per policy, against `baseline`: throughput at the target (mean ± interval over seeds), the paired
    ratio to the baseline's, whether that ratio's interval excludes 1 (a difference larger than the seeds'
    noise), and at each seed's best point the recomputed share of history tokens and the p90 TTFT."""
    if baseline not in results:
        return []
    base = results[baseline]["per_seed"]
    rows = []
    for policy, found in results.items():
        per_seed = found["per_seed"]
        seeds = sorted(per_seed, key=str)
        throughput = [per_seed[s]["throughput_rps"] if per_seed[s] else None for s in seeds]
        ratio = paired_ratio(throughput, [base[s]["throughput_rps"] if base.get(s) else None for s in seeds])
        best = [per_seed[s] for s in seeds if per_seed[s]]
        if policy == baseline:
            verdict = "baseline" if ratio.n else "baseline: target never met"
        elif ratio.n == 0:
            verdict = "no seed where both met the target"
        elif ratio.n < 2:
            verdict = "one seed: no interval"
        else:
            verdict = "larger than its interval" if ratio.excludes(1.0) else "within its interval (noise)"
        rows.append({
            "policy": policy, "seeds": len(seeds), "throughput": estimate(throughput).format(4),
            "ratio": ratio.format(3), "verdict": verdict,
            "recomputed_fraction": estimate([b["recomputed_fraction"] for b in best]).format(3),
            "ttft_p90_s": estimate([b["ttft_p90_s"] for b in best]).format(3),
        })
    return rows


# The metrics a plain sweep compares against its baseline, each as a ratio paired by seed.
PAIRED_METRICS = [("req/s", "throughput_rps"), ("norm lat mean", "norm_latency_mean_ms"), ("ttft mean", "ttft_mean_s"),
                  ("host hits", "cpu_hit_fraction"), ("recomputed tokens", "recomputed_tokens")]


def paired_point_table(table: list[dict], point_axes: list[str], baseline: str) -> list[dict]:
    """At each sweep point (its axes but the policy and the seed), each other policy's metrics over the
    baseline policy's at the same point, as ratios paired by seed (`PAIRED_METRICS`): `<metric>_ratio` (the
    mean) and `<metric>_ratio_ci95`, and in `<metric>_x` the two formatted with the verdict's mark (`*`:
    the interval excludes 1, a difference larger than the seeds' noise). Empty when no point has the
    baseline."""
    others = [a for a in point_axes if a != "cache.policy"]
    points: dict[tuple, dict[str, dict]] = {}
    for row in table:
        key = tuple(repr(row.get(a)) for a in others)
        points.setdefault(key, {}).setdefault(row["policy"], {})[row.get(REPLICATION_AXIS)] = row
    out = []
    for by_policy in points.values():
        base = by_policy.get(baseline)
        if base is None:
            continue
        for policy, per_seed in by_policy.items():
            if policy == baseline:
                continue
            seeds = [s for s in per_seed if s in base]
            first = per_seed[seeds[0]] if seeds else next(iter(per_seed.values()))
            row = {a: first.get(a) for a in others}
            row.update(policy=policy, seeds=len(seeds))
            for _, metric in PAIRED_METRICS:
                ratio = paired_ratio([per_seed[s].get(metric) for s in seeds], [base[s].get(metric) for s in seeds])
                row[f"{metric}_ratio"], row[f"{metric}_ratio_ci95"] = ratio.mean, ratio.half_width
                row[f"{metric}_x"] = ratio.format(3) + (" *" if ratio.excludes(1.0) else "")
            out.append(row)
    return out


def search_variants(points: list, source: str, target: float, jobs: int, metric: str = "mean") -> dict:
    """Throughput at the latency target per variant of the sweep's points (`variant_label`), under each seed:
    {variant: {"per_seed": {seed: best row or None}, "throughput_rps": mean and interval over the seeds}}."""
    by_policy: dict = {}
    for point, point_scenario in points:
        by_policy.setdefault((variant_label(point, point_scenario), point_scenario.seed), point_scenario)
    found: dict = {}
    try:
        with worker_pool(max(1, min(jobs, len(by_policy)))) as pool:
            futures = {key: pool.submit(throughput_at_target, s, source, target, 6, metric)
                       for key, s in by_policy.items()}
            try:
                for key, f in futures.items():
                    found[key] = f.result()
            except KeyboardInterrupt:  # keep the searches that had finished, in any order
                for key, f in futures.items():
                    if key not in found and f.done() and not f.cancelled() and f.exception() is None:
                        found[key] = f.result()
                raise
    except KeyboardInterrupt:
        raise SearchInterrupted(_by_policy(found), len({p for p, _ in by_policy})) from None
    return _by_policy(found)


def variant_label(point: dict, scenario) -> str:
    """What a search is for: the policy, plus the sweep's other axes but load and seed (e.g. "stateless
    (batching=prefill-first)"), so that every variant of a sweep gets its own throughput at the target."""
    others = [f"{key.split('.')[-1]}={value}" for key, value in point.items()
              if key not in ("cache.policy", LOAD_AXIS, REPLICATION_AXIS)]
    policy = scenario.cache.policy.type
    return f"{policy} ({', '.join(others)})" if others else policy


def _by_policy(found: dict) -> dict:
    results: dict = {}
    for (policy, seed), result in found.items():
        results.setdefault(policy, {"per_seed": {}})["per_seed"][seed] = _best(result)
    for entry in results.values():
        e = estimate([b["throughput_rps"] if b else None for b in entry["per_seed"].values()])
        entry["throughput_rps"] = {"mean": e.mean, "half_width": e.half_width, "n": e.n, "confidence": CONFIDENCE}
    return results


class SearchInterrupted(KeyboardInterrupt):
    """An interrupted --search, with the policies whose search had finished."""

    def __init__(self, results: dict, total: int) -> None:
        super().__init__()
        self.results, self.total = results, total


def _best(found: dict) -> dict | None:
    return {k: v for k, v in found["best"].items() if k != "summary"} if found["best"] else None
