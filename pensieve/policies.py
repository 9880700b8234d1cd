"""Eviction policies: a registry of classes chosen by name, or a user class by import path.

A policy decides *which* idle conversation gives up a chunk next; the cache manager owns
*how* chunks move. Each policy fixes three traits the manager relies on:
- `order`: "leading" evicts a conversation's earliest chunks first (dropped tokens are then
  a leading run, recomputed before the new prompt), "trailing" its latest chunks first
  (only a kept prefix is reused);
- `unit`: "chunk" moves one chunk at a time, "conversation" moves all of a conversation's
  chunks on a tier together;
- `uses_host_tier` and `retains_history`.
Lower scores are evicted first, and a conversation's chunks must score in nondecreasing
order along the policy's eviction order (the manager relies on it to select victims quickly).
"""
from __future__ import annotations

import bisect
import importlib

import numpy as np

from .cost import CostModel, LinearCostModel

# An idle time of zero (a conversation that finished this very step) would make Cost/T
# infinite; the floor keeps scores finite and ordered by cost among equally fresh chunks.
MIN_IDLE_S = 1e-6


class EvictionPolicy:
    """Base class. Subclasses set the traits and override `score`."""

    name = "base"
    order = "leading"
    unit = "chunk"
    uses_host_tier = True
    retains_history = True

    def __init__(self, cost_model: CostModel | None = None) -> None:
        self.cost_model = cost_model or LinearCostModel()
        self._chunk_cost: list[float] = []

    def bind(self, chunk_tokens: int, max_chunks: int) -> None:
        """Tabulate Cost(l) per chunk index once, so scoring is a list lookup in the hot path.

        Recomputing a chunk after more context never costs less, and victim selection relies on
        a conversation's chunk costs rising along it; a cost model that dips (interpolating a
        profile measured for another chunk size, say) is made nondecreasing here.
        """
        costs = [self.cost_model.chunk_recompute_s(i * chunk_tokens, chunk_tokens) for i in range(max_chunks + 1)]
        self._chunk_cost = np.maximum.accumulate(costs).tolist()
        self._min_cost = min(self._chunk_cost)
        self._cost_array = np.asarray(self._chunk_cost)

    def chunk_cost(self, chunk_index: int) -> float:
        return self._chunk_cost[chunk_index]

    def score(self, chunk_index: int, idle_s: float) -> float:
        """Retention value of a conversation's chunk at `chunk_index`, idle for `idle_s` seconds."""
        raise NotImplementedError

    def score_array(self, chunk_index: np.ndarray, idle_s: np.ndarray) -> np.ndarray:
        """`score` over arrays; override with a vectorised form (results must match `score` exactly)."""
        return np.fromiter((self.score(int(i), float(t)) for i, t in zip(chunk_index, idle_s)),
                           dtype=float, count=len(chunk_index))

    def chunks_below(self, n: int, first: int, end: int, idle_s: float, bound: float, trailing: bool) -> int:
        """How many chunks from eviction position `first` (before `end`) score under `bound`.

        A conversation of `n` chunks; positions map to chunk indices in reverse when trailing.
        """
        count = 0
        for j in range(first, end):
            if self.score(n - 1 - j if trailing else j, idle_s) >= bound:
                break
            count += 1
        return count

    def chunks_below_array(self, n: np.ndarray, first: np.ndarray, end: np.ndarray, idle_s: np.ndarray,
                           bound: float, trailing: bool) -> np.ndarray:
        """`chunks_below` over arrays of conversations; override with a vectorised form (same results)."""
        return np.fromiter((self.chunks_below(int(a), int(b), int(c), float(t), bound, trailing)
                            for a, b, c, t in zip(n, first, end, idle_s)), dtype=int, count=len(n))

    def score_floor(self, idle_s: float) -> float:
        """A lower bound on `score(i, t)` for every chunk i and every t <= idle_s.

        The manager scans idle conversations from the longest idle down and stops once this
        bound cannot beat the victims it already holds; -inf (the default) scans them all.
        """
        return float("-inf")


class PensievePolicy(EvictionPolicy):
    """Retention value V = Cost(l) / T (§4.3.1): idle conversations and cheap leading chunks go first."""

    name = "pensieve"

    def score(self, chunk_index: int, idle_s: float) -> float:
        return self._chunk_cost[chunk_index] / max(idle_s, MIN_IDLE_S)

    def score_array(self, chunk_index: np.ndarray, idle_s: np.ndarray) -> np.ndarray:
        return self._cost_array[chunk_index] / np.maximum(idle_s, MIN_IDLE_S)

    def chunks_below(self, n: int, first: int, end: int, idle_s: float, bound: float, trailing: bool) -> int:
        if trailing:
            return super().chunks_below(n, first, end, idle_s, bound, trailing)
        # Leading order: cost is nondecreasing in the index, so bisect; then settle the
        # boundary with the exact score, since cost < bound * T can round differently.
        t = max(idle_s, MIN_IDLE_S)
        cut = bisect.bisect_left(self._chunk_cost, bound * t, first, end)
        while cut > first and self._chunk_cost[cut - 1] / t >= bound:
            cut -= 1
        while cut < end and self._chunk_cost[cut] / t < bound:
            cut += 1
        return cut - first

    def chunks_below_array(self, n: np.ndarray, first: np.ndarray, end: np.ndarray, idle_s: np.ndarray,
                           bound: float, trailing: bool) -> np.ndarray:
        if trailing:
            return super().chunks_below_array(n, first, end, idle_s, bound, trailing)
        # chunks_below's bisect and boundary settling, element by element in numpy
        cost, top = self._cost_array, len(self._cost_array) - 1
        t = np.maximum(idle_s, MIN_IDLE_S)
        cut = np.clip(np.searchsorted(cost, bound * t, side="left"), first, end)
        while (down := (cut > first) & (cost[np.maximum(cut - 1, 0)] / t >= bound)).any():
            cut -= down
        while (up := (cut < end) & (cost[np.minimum(cut, top)] / t < bound)).any():
            cut += up
        return cut - first

    def score_floor(self, idle_s: float) -> float:
        return self._min_cost / max(idle_s, MIN_IDLE_S)


class PensieveGpuPolicy(PensievePolicy):
    """Pensieve's policy with no host tier: evicted chunks are dropped (the paper's "GPU cache")."""

    name = "pensieve-gpu"
    uses_host_tier = False


class LruPolicy(EvictionPolicy):
    """Chunk-level LRU by conversation idle time, two tiers; leading chunks first within a conversation.

    Leading-first keeps dropped tokens recomputable as one leading span, so this differs from
    `pensieve` only in ignoring recomputation cost: the ablation of §6.6.
    """

    name = "lru"

    def score(self, chunk_index: int, idle_s: float) -> float:
        return -idle_s

    def score_array(self, chunk_index: np.ndarray, idle_s: np.ndarray) -> np.ndarray:
        return -idle_s

    def chunks_below_array(self, n: np.ndarray, first: np.ndarray, end: np.ndarray, idle_s: np.ndarray,
                           bound: float, trailing: bool) -> np.ndarray:
        # every chunk of a conversation scores -idle: all of them are under the bound, or none
        return np.where(-idle_s < bound, end - first, 0)

    def score_floor(self, idle_s: float) -> float:
        return -idle_s


class ConversationLruPolicy(LruPolicy):
    """Whole conversations move and drop together, oldest first (CachedAttention-like)."""

    name = "conversation-lru"
    unit = "conversation"


class TrailingLruPolicy(LruPolicy):
    """LRU that evicts from the end of a conversation; only a kept prefix is reused.

    This is what vLLM's prefix caching and SGLang's radix cache do: a lost block makes every
    later block unreachable, so they evict trailing blocks first.
    """

    name = "trailing-lru"
    order = "trailing"


class StatelessPolicy(EvictionPolicy):
    """No reuse: a finished turn's KV is freed and the next turn recomputes the whole history."""

    name = "stateless"
    uses_host_tier = False
    retains_history = False

    def score(self, chunk_index: int, idle_s: float) -> float:
        return -idle_s


REGISTRY: dict[str, type[EvictionPolicy]] = {
    cls.name: cls
    for cls in (PensievePolicy, PensieveGpuPolicy, LruPolicy, ConversationLruPolicy, TrailingLruPolicy, StatelessPolicy)
}


def policy_class(name: str) -> type[EvictionPolicy]:
    """A registered policy by name, or a user class given as `package.module:ClassName`."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" not in name:
        raise ValueError(
            f"unknown policy {name!r}; allowed: {', '.join(REGISTRY)} or an import path 'package.module:Class'"
        )
    module_name, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"policy {name!r} cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, EvictionPolicy)):
        raise ValueError(f"policy {name!r} is not a subclass of pensieve.policies.EvictionPolicy")
    if cls.order not in ("leading", "trailing") or cls.unit not in ("chunk", "conversation"):
        raise ValueError(f"policy {name!r}: order must be leading|trailing and unit chunk|conversation")
    return cls


def make_policy(name: str, cost_model: CostModel | None = None) -> EvictionPolicy:
    return policy_class(name)(cost_model)
