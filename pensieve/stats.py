"""Replication statistics: means over seeds with Student-t 95% confidence intervals, and paired ratios.

A simulated figure from one seed says little on its own: at 0.1 conversations/s the quick-start
model's mean latency moved by 2x between seeds while two policies differed by 2%. Every aggregate
here carries its interval and its count, so a table can say when a difference is smaller than it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over n replications and the half-width of its confidence interval (nan when n < 2)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes(self, value: float) -> bool:
        """Whether the interval lies wholly on one side of `value` (a difference larger than the noise)."""
        return not math.isnan(self.half_width) and not (self.low <= value <= self.high)

    def format(self, digits: int = 3, scale: float = 1.0) -> str:
        if self.n < 2 or math.isnan(self.half_width):
            return f"{self.mean * scale:.{digits}g}"
        return f"{self.mean * scale:.{digits}g} ± {self.half_width * scale:.2g}"


def estimate(values, confidence: float = CONFIDENCE) -> Estimate:
    """Mean and Student-t confidence half-width of independent replications (seeds)."""
    x = np.asarray([v for v in values if v is not None], float)
    n = len(x)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    if n == 1:
        return Estimate(float(x[0]), math.nan, 1)
    sem = float(np.std(x, ddof=1)) / math.sqrt(n)
    return Estimate(float(x.mean()), float(stats.t.ppf((1 + confidence) / 2, n - 1) * sem), n)


def paired_ratio(values, baseline, confidence: float = CONFIDENCE) -> Estimate:
    """The ratio values / baseline over paired replications (the same seed on both sides): the mean of the
    per-seed ratios, with its interval. Pairing removes the workload's own seed-to-seed variation, which is
    usually far larger than a policy's effect."""
    pairs = [(v, b) for v, b in zip(values, baseline) if v is not None and b is not None and b > 0]
    return estimate([v / b for v, b in pairs], confidence)


def aggregate(rows: list[dict], keys: list[str], exclude: tuple[str, ...] = ()) -> list[dict]:
    """Rows grouped by the values of `keys` (a sweep point without its seed), in first-seen order; each
    numeric column of the first row (but `keys` and `exclude`) becomes `<column>` (the mean), `<column>_ci95`
    (the half-width) and `seeds` (the count)."""
    columns = [k for k, v in (rows[0] if rows else {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys and k not in exclude]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(repr(row.get(k)) for k in keys), []).append(row)
    out = []
    for members in groups.values():
        merged = {k: members[0].get(k) for k in keys}
        merged["seeds"] = len(members)
        for column in columns:
            values = [m[column] for m in members if isinstance(m.get(column), (int, float))]
            if not values:
                continue
            e = estimate(values)
            merged[column] = e.mean
            merged[f"{column}_ci95"] = e.half_width
        out.append(merged)
    return out
