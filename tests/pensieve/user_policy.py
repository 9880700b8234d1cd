"""A user policy loaded by import path in the tests: evicts the most recently active first."""
from pensieve.policies import EvictionPolicy


class NewestFirst(EvictionPolicy):
    name = "newest-first"
    uses_host_tier = False

    def score(self, chunk_index: int, idle_s: float) -> float:
        return idle_s


class AgedCost(EvictionPolicy):
    """Cost(l) over idle time raised to a power: a user policy with a parameter (cache.policy.params)."""

    name = "aged-cost"
    victim_index = "retention"

    def __init__(self, cost_model=None, power: float = 1.0) -> None:
        super().__init__(cost_model)
        self.power = power

    def score(self, chunk_index: int, idle_s: float) -> float:
        return self.chunk_cost(chunk_index) / max(idle_s, 1e-6) ** self.power
