"""Cost models: what recomputing a chunk costs (the retention value's Cost(l)) and step times.

The interface is small so that a profile-backed model (measured tables, interpolated) plugs in
beside the linear one without the policies or the scheduler knowing which they use.
"""
from __future__ import annotations

from abc import ABC, abstractmethod


class CostModel(ABC):
    """Seconds of device time for pieces of work."""

    @abstractmethod
    def chunk_recompute_s(self, context_tokens: int, chunk_tokens: int) -> float:
        """Cost(l): recomputing one chunk of `chunk_tokens` whose context (tokens before it) is l."""

    @property
    def times_steps(self) -> bool:
        """Whether this model gives step times (the simulator needs them; Cost(l) alone does not)."""
        return type(self).step_time_s is not CostModel.step_time_s

    def step_time_s(self, plan, chunk_tokens: int) -> float:
        """Seconds one StepPlan takes on the device (the simulator's clock); profiles provide it."""
        raise NotImplementedError(f"{type(self).__name__} cannot time steps; give the scenario a profile")

    def decode_step_s(self, decodes: int, context_tokens: int, chunk_tokens: int) -> float:
        """Seconds of a step of `decodes` decodes alone (no prefill, no copies) with that summed
        context: exactly what `step_time_s` gives such a plan. Override with a direct form."""
        from .plan import StepPlan

        return self.step_time_s(StepPlan(0, [0] * decodes, context_tokens, [], [], []), chunk_tokens)


class LinearCostModel(CostModel):
    """Cost(l) = a * l + c per chunk.

    The paper profiles Cost(l) = Cost_attention(l) + c and notes that attention cost grows
    linearly with context (§4.3.1), so a line is the model's shape until a profile replaces it.
    Defaults (a = 2e-7 s per context token, c = 1e-3 s) are of the order of a 13B model on an
    A100; only their ratio affects eviction order, which is what matters before profiles exist.
    """

    def __init__(self, a: float = 2e-7, c: float = 1e-3) -> None:
        if a < 0 or c <= 0:
            raise ValueError(f"linear cost model: need a >= 0 and c > 0, got a={a}, c={c}")
        self.a = a
        self.c = c

    def chunk_recompute_s(self, context_tokens: int, chunk_tokens: int) -> float:
        return self.a * context_tokens + self.c


class ScaledCostModel(CostModel):
    """Another cost model's times multiplied by `factor`.

    For a profile taken on this machine while it ran faster or slower than it does now: `pensieve
    validate` measures that factor at grid points before and after its real run. A uniform factor
    leaves every eviction order unchanged (retention values all scale alike); only the clock moves.
    """

    def __init__(self, base: CostModel, factor: float) -> None:
        if not factor > 0:
            raise ValueError(f"scaled cost model: factor must be positive, got {factor}")
        self.base = base
        self.factor = factor
        self.profile = getattr(base, "profile", None)

    def chunk_recompute_s(self, context_tokens: int, chunk_tokens: int) -> float:
        return self.factor * self.base.chunk_recompute_s(context_tokens, chunk_tokens)

    def step_time_s(self, plan, chunk_tokens: int) -> float:
        return self.factor * self.base.step_time_s(plan, chunk_tokens)

    def decode_step_s(self, decodes: int, context_tokens: int, chunk_tokens: int) -> float:
        return self.factor * self.base.decode_step_s(decodes, context_tokens, chunk_tokens)
