"""A small affine cost model so simulator tests do not depend on a measured profile."""
from pensieve.cost import CostModel


class AffineCost(CostModel):
    """Step time = overhead + per-token compute + attention over context + swap-ins (made-up units)."""

    def chunk_recompute_s(self, context_tokens: int, chunk_tokens: int) -> float:
        return 1e-7 * context_tokens + 1e-3

    def step_time_s(self, plan, chunk_tokens: int) -> float:
        attention = sum(p.context_tokens * p.query_tokens for p in plan.prefills) * 1e-9
        attention += plan.decode_context_tokens * 1e-8
        return 0.005 + plan.num_tokens * 2e-5 + attention + len(plan.swap_in) * 1e-5
