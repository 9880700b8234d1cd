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
idle_s)`. A policy whose ranking needs more than that (how often a conversation came back, its
own think time, where a chunk sits in it) sets `per_conversation = True` and implements
`score_conversation(conv, chunk_index, idle_s)`, reading the conversation and the state it keeps
through the cache's notifications (`on_admit`, `on_release`, `on_lost`, `on_forget`); such a
policy is served by the scan index, which scores every idle conversation at each eviction, so a
score that changes with the policy's own state between evictions is still followed exactly.

Lower scores are evicted first. The contract, checked at `bind` (a policy that breaks
it is refused with `PolicyContractError`): a conversation's chunks score in nondecreasing order
along the policy's eviction order, at every idle time, so that a conversation's next chunk in
eviction order is also its lowest-scoring one. A declared `victim_index` is checked the same way.
"""
from __future__ import annotations

import importlib

import numpy as np

from .cost import CostModel, LinearCostModel
from .request import Conversation

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
    per_conversation = False

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
        self._chunk_tokens = chunk_tokens
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
        if self.per_conversation:
            if self.victim_index != "scan":
                raise PolicyContractError(f"policy {self.name!r} scores per conversation (per_conversation = True), "
                                          f"which only the scan index follows exactly; declare victim_index = 'scan'")
            # A conversation the policy has never been told about, as long as the context allows.
            stand_in = Conversation(("contract", self.name), 0.0)
            stand_in.dev = [-1] * max_chunks
            stand_in.host = [-1] * max_chunks
            stand_in.tokens = stand_in.kv_tokens = max_chunks * self._chunk_tokens
            rows = [[self.score_conversation(stand_in, i, t) for i in range(max_chunks)] for t in CONTRACT_IDLE_S]
        else:
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

    def score_conversation(self, conv: Conversation, chunk_index: int, idle_s: float):
        """The score of `conv`'s chunk at `chunk_index`, idle for `idle_s` seconds, for a policy that
        reads the conversation (`per_conversation`); any value that orders (a number or a tuple)."""
        return self.score(chunk_index, idle_s)

    # Notifications from the cache manager, for policies that keep per-conversation state.
    def on_admit(self, conv: Conversation, now: float, kept_chunks: int) -> None:
        """A turn of `conv` is admitted; `kept_chunks` of its history were still kept on some tier."""

    def on_release(self, conv: Conversation, now: float) -> None:
        """`conv`'s request finished or was suspended: it is idle (evictable) from `now`."""

    def on_lost(self, conv: Conversation) -> None:
        """`conv`'s last kept chunk was dropped: nothing of its history is cached any more."""

    def on_forget(self, conv: Conversation) -> None:
        """`conv` will never return: drop what is kept about it."""

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


# ---------------------------------------------------------------------------------------------
# The policies other engines ship, ranking conversations (SGLang's radix cache, vLLM's CPU tier,
# T-LRU). Each ranks a conversation by a class first and its idle time second: a score is the
# tuple (class, -idle time), lowest evicted first, the same for all of a conversation's chunks
# unless said otherwise.


class _UseCounting(EvictionPolicy):
    """Counts a conversation's uses: its first turn, and every later turn that found some of its
    history still kept (SGLang counts a radix node's hits the same way: on insert, then per match)."""

    per_conversation = True

    def __init__(self, cost_model: CostModel | None = None) -> None:
        super().__init__(cost_model)
        self.uses: dict[object, int] = {}

    def on_admit(self, conv: Conversation, now: float, kept_chunks: int) -> None:
        uses = self.uses.get(conv.id)
        if uses is None:
            self.uses[conv.id] = 1
        elif kept_chunks:
            self.uses[conv.id] = uses + 1

    def on_forget(self, conv: Conversation) -> None:
        self.uses.pop(conv.id, None)


class LfuPolicy(_UseCounting):
    """Least frequently used conversation first (SGLang's `lfu`), the longer idle first among equals;
    leading chunks first within a conversation, like `lru`."""

    name = "lfu"

    def score_conversation(self, conv: Conversation, chunk_index: int, idle_s: float):
        return (self.uses.get(conv.id, 0), -idle_s)


class SlruPolicy(_UseCounting):
    """Segmented LRU (SGLang's `slru`): conversations used fewer than `protect_after` times (by
    default: never reused yet) form the probationary segment and are evicted first, oldest first;
    then the protected ones, oldest first. Like SGLang's, the protected segment is not capped."""

    name = "slru"

    def __init__(self, cost_model: CostModel | None = None, protect_after: int = 2) -> None:
        super().__init__(cost_model)
        if isinstance(protect_after, bool) or not isinstance(protect_after, int) or protect_after < 1:
            raise ValueError(f"protect_after must be a whole number of uses >= 1, got {protect_after!r}")
        self.protect_after = protect_after

    def score_conversation(self, conv: Conversation, chunk_index: int, idle_s: float):
        return (int(self.uses.get(conv.id, 0) >= self.protect_after), -idle_s)


class ArcPolicy(EvictionPolicy):
    """Adaptive Replacement Cache (Megiddo and Modha, FAST '03; vLLM's CPU tier offers it) over
    conversations rather than blocks.

    T1 holds conversations used once so far, T2 those reused; a conversation whose whole history
    was dropped becomes a ghost of its list (B1 or B2). A ghost that comes back moves the target
    size p of T1: up by max(1, |B2|/|B1|) from B1, down by max(1, |B1|/|B2|) from B2, and joins T2.
    Eviction takes T1's oldest first while |T1| > p, else T2's oldest (then the other list).
    Sizes count conversations holding chunks; the ghost lists are not capped (a simulator can keep
    every conversation's history), and the tie rule for a B2 hit with |T1| = p is left out.
    """

    name = "arc"
    per_conversation = True

    def __init__(self, cost_model: CostModel | None = None) -> None:
        super().__init__(cost_model)
        self.in_t2: dict[object, bool] = {}  # conversation id -> reused (T2) or not (T1)
        self.ghosts: set = set()  # conversations whose whole history is dropped
        self.sizes = {"t1": 0, "t2": 0, "b1": 0, "b2": 0}
        self.target_t1 = 0.0  # p

    def _count(self, conversation_id, ghost: bool, change: int) -> None:
        t2 = self.in_t2[conversation_id]
        key = ("b" if ghost else "t") + ("2" if t2 else "1")
        self.sizes[key] += change

    def on_admit(self, conv: Conversation, now: float, kept_chunks: int) -> None:
        cid, sizes = conv.id, self.sizes
        if cid not in self.in_t2:  # a new conversation
            self.in_t2[cid] = False
            sizes["t1"] += 1
            return
        if cid in self.ghosts:
            b1, b2 = sizes["b1"], sizes["b2"]
            if self.in_t2[cid]:
                self.target_t1 = max(0.0, self.target_t1 - max(1.0, b1 / b2))
            else:
                self.target_t1 = min(float(sizes["t1"] + sizes["t2"] + 1), self.target_t1 + max(1.0, b2 / b1))
            self._count(cid, True, -1)
            self.ghosts.discard(cid)
        else:
            self._count(cid, False, -1)
        self.in_t2[cid] = True
        sizes["t2"] += 1

    def on_lost(self, conv: Conversation) -> None:
        cid = conv.id
        if cid in self.in_t2 and cid not in self.ghosts:
            self._count(cid, False, -1)
            self.ghosts.add(cid)
            self._count(cid, True, +1)

    def on_forget(self, conv: Conversation) -> None:
        cid = conv.id
        if cid in self.in_t2:
            self._count(cid, cid in self.ghosts, -1)
            self.ghosts.discard(cid)
            del self.in_t2[cid]

    def score_conversation(self, conv: Conversation, chunk_index: int, idle_s: float):
        t1_first = self.sizes["t1"] > self.target_t1
        in_t1 = not self.in_t2.get(conv.id, False)
        return (int(in_t1 != t1_first), -idle_s)


class TailOptimizedLruPolicy(EvictionPolicy):
    """T-LRU (tail-optimized LRU; "Tail-Optimized Caching for LLM Inference", NeurIPS '25; in vLLM
    and SGLang): a conversation's next prompt of about `next_prompt_tokens` tokens stays within a
    time-to-first-token budget while it prefills at most `threshold_tokens` uncached tokens, so the
    first threshold - next_prompt tokens of a conversation in eviction order are safe to evict.
    Safe chunks go first, oldest conversation first; then the rest, in plain LRU order.
    Leading-first here, like `lru`; `trailing-tlru` evicts from the end, as vLLM and SGLang do.
    """

    name = "tlru"
    per_conversation = True

    def __init__(self, cost_model: CostModel | None = None, threshold_tokens: int = 1024,
                 next_prompt_tokens: int = 256) -> None:
        super().__init__(cost_model)
        for key, value in (("threshold_tokens", threshold_tokens), ("next_prompt_tokens", next_prompt_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be a whole number of tokens >= 0, got {value!r}")
        self.threshold_tokens, self.next_prompt_tokens = threshold_tokens, next_prompt_tokens

    def bind(self, chunk_tokens: int, max_chunks: int) -> None:
        # Chunks at eviction positions below this are safe: dropping them and everything before them
        # leaves at most threshold - next prompt uncached history tokens.
        self.safe_chunks = max(0, self.threshold_tokens - self.next_prompt_tokens) // chunk_tokens
        super().bind(chunk_tokens, max_chunks)

    def score_conversation(self, conv: Conversation, chunk_index: int, idle_s: float):
        position = len(conv.dev) - 1 - chunk_index if self.order == "trailing" else chunk_index
        return (int(position >= self.safe_chunks), -idle_s)


class TrailingTailOptimizedLruPolicy(TailOptimizedLruPolicy):
    """T-LRU evicting from the end of a conversation, as vLLM's and SGLang's prefix caches do."""

    name = "trailing-tlru"
    order = "trailing"


class SessionAwarePolicy(EvictionPolicy):
    """Session-aware eviction: the most overdue idle conversation first, from its end.

    A conversation's think time is learnt from its own gaps (release to next arrival), starting
    from the mean gap over all conversations so far (`prior_gap_s` before any was seen); a
    conversation idle for many of its own think times has most likely ended, whatever its
    absolute idle time. Tail-first within a conversation, so its prefix outlives its suffix, as in
    vLLM's proposed session-aware eviction (which groups blocks into sessions the same way; its
    exact session ranking is its own).
    """

    name = "session-aware"
    order = "trailing"
    per_conversation = True

    def __init__(self, cost_model: CostModel | None = None, prior_gap_s: float = 60.0) -> None:
        super().__init__(cost_model)
        if isinstance(prior_gap_s, bool) or not isinstance(prior_gap_s, (int, float)) or not prior_gap_s > 0:
            raise ValueError(f"prior_gap_s must be a number of seconds > 0, got {prior_gap_s!r}")
        self.prior_gap_s = float(prior_gap_s)
        self.gaps: dict[object, tuple[float, int]] = {}  # conversation id -> (sum of its gaps, count)
        self.all_gaps = [0.0, 0]
        # Its own record of release times: queue-aware look-ahead moves a conversation's last_active to its
        # next turn's arrival, which would hide the think time.
        self.released_at: dict[object, float] = {}

    def on_release(self, conv: Conversation, now: float) -> None:
        self.released_at[conv.id] = now

    def on_admit(self, conv: Conversation, now: float, kept_chunks: int) -> None:
        released = self.released_at.pop(conv.id, None)
        if released is None:
            return
        gap = max(0.0, now - released)
        total, count = self.gaps.get(conv.id, (0.0, 0))
        self.gaps[conv.id] = (total + gap, count + 1)
        self.all_gaps[0] += gap
        self.all_gaps[1] += 1

    def on_forget(self, conv: Conversation) -> None:
        self.gaps.pop(conv.id, None)
        self.released_at.pop(conv.id, None)

    def expected_gap_s(self, conversation_id) -> float:
        total, count = self.gaps.get(conversation_id, (0.0, 0))
        if count:
            return max(total / count, MIN_IDLE_S)
        seen_total, seen = self.all_gaps
        return max(seen_total / seen, MIN_IDLE_S) if seen else self.prior_gap_s

    def score_conversation(self, conv: Conversation, chunk_index: int, idle_s: float):
        return (-idle_s / self.expected_gap_s(conv.id), -idle_s)


REGISTRY: dict[str, type[EvictionPolicy]] = {
    cls.name: cls
    for cls in (PensievePolicy, PensieveGpuPolicy, LruPolicy, ConversationLruPolicy, TrailingLruPolicy, StatelessPolicy,
                LfuPolicy, SlruPolicy, ArcPolicy, TailOptimizedLruPolicy, TrailingTailOptimizedLruPolicy,
                SessionAwarePolicy)
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
