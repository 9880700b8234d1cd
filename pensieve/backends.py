"""A backend that only keeps books: no model, no clock. For tests and the core benchmark."""
from __future__ import annotations

from .plan import StepPlan, StepResult


class BookkeepingBackend:
    """Carries out a plan by recording it; every step 'takes' a fixed time."""

    def __init__(self, step_s: float = 0.0) -> None:
        self.step_s = step_s
        self.steps = 0
        self.swap_in_chunks = 0
        self.swap_out_chunks = 0

    def execute(self, plan: StepPlan) -> StepResult:
        self.steps += 1
        self.swap_in_chunks += len(plan.swap_in)
        self.swap_out_chunks += len(plan.swap_out)
        return StepResult(duration_s=self.step_s)
