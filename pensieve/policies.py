"""Eviction policies: a registry of classes chosen by name, or a user class by import path.

A policy decides *which* idle conversation gives up a chunk next; the cache manager owns
*how* chunks move. Each policy fixes three traits the manager relies on:
- `order`: "leading" evicts a conversation's earliest chunks first (dropped tokens are then
  a leading run, recomputed before the new prompt), "trailing" its latest chunks first
  (only a kept prefix is reused);
- `unit`: "chunk" moves one chunk at a time, "conversation" moves all of a conversation's
  chunks on a tier together;
- `uses_host_tier` and `retains_history`;
- `victim_index`: which exact victim index its score allows (see `pensieve.victims`):
  "recency" (the score depends on idle time alone and never rises with it), "retention" (it
  never rises with idle time at a fixed chunk) or "scan" (anything else; the default).

What a policy minimally implements: a subclass of `EvictionPolicy` with a `score(chunk_index,
idle_s)`. Lower scores are evicted first. The contract, checked at `bind` (a policy that breaks
it is refused with `PolicyContractError`): a conversation's chunks score in nondecreasing order
along the policy's eviction order, at every idle time, so that a conversation's next chunk in
eviction order is also its lowest-scoring one. A declared `victim_index` is checked the same way.
"""
from __future__ import annotations

import importlib

import numpy as np

from .cost import CostModel, LinearCostModel

# An idle time of zero (a conversation that finished this very step) would make Cost/T
# infinite; the floor keeps scores finite and ordered by cost among equally fresh chunks.
MIN_IDLE_S = 1e-6

# Idle times at which `bind` checks a policy's contract: from a conversation released this very
# step to one idle for a day.
CONTRACT_IDLE_S = (0.0, 1e-6, 1e-3, 0.5, 1.0, 60.0, 3600.0, 86400.0)


class PolicyContractError(ValueError):
    """A policy whose scores break the contract victim selection relies on (see the module doc)."""


class EvictionPolicy:
    """Base class. Subclasses set the traits and override `score`."""

    name = "base"
    order = "leading"
    unit = "chunk"
    uses_host_tier = True
    retains_history = True
    victim_index = "scan"

    def __init__(self, cost_model: CostModel | None = None) -> None:
        self.cost_model = cost_model or LinearCostModel()
        self._chunk_cost: list[float] = []

    def bind(self, chunk_tokens: int, max_chunks: int) -> None:
        """Tabulate Cost(l) per chunk index once, so scoring is a list lookup in the hot path.

        Recomputing a chunk after more context never costs less, and victim selection relies on
        a conversation's chunk costs rising along it; a cost model that dips (interpolating a
        profile measured for another chunk size, say) is made nondecreasing here. Then the
        policy's contract is checked.
        """
        costs = [self.cost_model.chunk_recompute_s(i * chunk_tokens, chunk_tokens) for i in range(max_chunks + 1)]
        self._chunk_cost = np.maximum.accumulate(costs).tolist()
        self._cost_array = np.asarray(self._chunk_cost)
        try:
            self.check_contract(max_chunks)
        except PolicyContractError:
            raise
        except Exception as exc:  # a user policy's score failed: say so at bind, not mid-run
            raise PolicyContractError(f"policy {self.name!r} ({type(self).__name__}): score raised "
                                      f"{type(exc).__name__}: {exc} when checked at bind") from exc

    def check_contract(self, max_chunks: int) -> None:
        """Refuse (PolicyContractError) scores that fall along the eviction order, or that break the
        declared `victim_index`, at any chunk of a `max_chunks` conversation and idle times from
        0 s to a day (CONTRACT_IDLE_S)."""
        trailing = self.order == "trailing"
        rows = [[self.score(i, t) for i in range(max_chunks)] for t in CONTRACT_IDLE_S]
        for t, row in zip(CONTRACT_IDLE_S, rows):
            along = row[::-1] if trailing else row  # scores in eviction order
            for p in range(len(along) - 1):
                if not along[p] <= along[p + 1]:
                    a, b = (max_chunks - 1 - p, max_chunks - 2 - p) if trailing else (p, p + 1)
                    raise PolicyContractError(
                        f"policy {self.name!r} ({type(self).__name__}) breaks the eviction contract: at idle time {t} s "
                        f"chunk {b} scores {along[p + 1]!r}, below chunk {a}'s {along[p]!r}, which its {self.order} "
                        f"order evicts first; scores must be nondecreasing along the eviction order")
        if self.unit == "conversation" and any(row[i] != row[0] for row in rows for i in range(max_chunks)):
            # A whole-conversation policy ranks conversations by their head chunk but moves every
            # chunk; with scores that differ along a conversation, taking part of one (a reclaim
            # of a few slots) would not follow retention order.
            raise PolicyContractError(
                f"policy {self.name!r} moves whole conversations (unit = 'conversation'), so its score must not "
                f"depend on the chunk, but it does; use unit = 'chunk' or a score of idle time alone")
        if self.victim_index not in ("recency", "retention", "scan"):
            raise PolicyContractError(f"policy {self.name!r}: victim_index must be recency, retention or scan, "
                                      f"got {self.victim_index!r}")
        if self.victim_index == "scan":
            return
        for i in range(max_chunks):
            column = [row[i] for row in rows]  # idle times ascending
            if any(not later <= earlier for earlier, later in zip(column, column[1:])):
                raise PolicyContractError(
                    f"policy {self.name!r} declares victim_index {self.victim_index!r}, but chunk {i}'s score "
                    f"rises with idle time ({column}); declare victim_index = 'scan'")
            if self.victim_index == "recency" and any(row[i] != row[0] for row in rows):
                raise PolicyContractError(
                    f"policy {self.name!r} declares victim_index 'recency', but its score depends on the chunk "
                    f"(chunk {i} against chunk 0); declare 'retention' or 'scan'")

    def chunk_cost(self, chunk_index: int) -> float:
        return self._chunk_cost[chunk_index]

    def score(self, chunk_index: int, idle_s: float) -> float:
        """Retention value of a conversation's chunk at `chunk_index`, idle for `idle_s` seconds."""
        raise NotImplementedError

    def score_array(self, chunk_index: np.ndarray, idle_s: np.ndarray) -> np.ndarray:
        """`score` over arrays; override with a vectorised form (results must match `score` exactly)."""
        return np.fromiter((self.score(int(i), float(t)) for i, t in zip(chunk_index, idle_s)),
                           dtype=float, count=len(chunk_index))


class PensievePolicy(EvictionPolicy):
    """Retention value V = Cost(l) / T (§4.3.1): idle conversations and cheap leading chunks go first."""

    name = "pensieve"
    victim_index = "retention"

    def score(self, chunk_index: int, idle_s: float) -> float:
        return self._chunk_cost[chunk_index] / max(idle_s, MIN_IDLE_S)

    def score_array(self, chunk_index: np.ndarray, idle_s: np.ndarray) -> np.ndarray:
        return self._cost_array[chunk_index] / np.maximum(idle_s, MIN_IDLE_S)


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
    victim_index = "recency"

    def score(self, chunk_index: int, idle_s: float) -> float:
        return -idle_s

    def score_array(self, chunk_index: np.ndarray, idle_s: np.ndarray) -> np.ndarray:
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
    victim_index = "recency"

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
    except Exception as exc:  # the module's own top-level code failed
        raise ValueError(f"policy {name!r}: importing {module_name} raised {type(exc).__name__}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, EvictionPolicy)):
        raise ValueError(f"policy {name!r} is not a subclass of pensieve.policies.EvictionPolicy")
    if cls.order not in ("leading", "trailing") or cls.unit not in ("chunk", "conversation"):
        raise ValueError(f"policy {name!r}: order must be leading|trailing and unit chunk|conversation")
    return cls


def make_policy(name: str, cost_model: CostModel | None = None) -> EvictionPolicy:
    return policy_class(name)(cost_model)
