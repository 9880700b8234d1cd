"""A user policy loaded by import path in the tests: evicts the most recently active first."""
from pensieve.policies import EvictionPolicy


class NewestFirst(EvictionPolicy):
    name = "newest-first"
    uses_host_tier = False

    def score(self, chunk_index: int, idle_s: float) -> float:
        return idle_s
