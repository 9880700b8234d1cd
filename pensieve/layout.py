"""Eviction order: the one place that maps a conversation's eviction positions to chunk indices.

A policy evicts a conversation's chunks in a fixed order: its earliest chunks first (leading,
Pensieve and the LRU ablation) or its latest first (trailing, vLLM's and SGLang's prefix caches).
Everything else in the core speaks of *eviction positions* 0..n-1 and of the layout's boundaries
on `Conversation` (`drop_end <= host_end <= copy_end <= chunks`):

    [0, drop_end) dropped | [drop_end, host_end) host only | [host_end, copy_end) on both tiers |
    [copy_end, chunks) device only

and asks an `EvictionOrder` where those positions sit in the conversation's `dev` and `host`
slot lists, which are kept in chunk (token) order.
"""
from __future__ import annotations


class EvictionOrder:
    """Maps eviction positions of a conversation of n chunks to chunk indices."""

    trailing = False

    def index(self, n: int, position: int) -> int:
        """The chunk index at eviction position `position`."""
        raise NotImplementedError

    def indices(self, n: int, first: int, end: int) -> slice:
        """The chunk indices of eviction positions [first, end), as a slice in chunk order."""
        raise NotImplementedError

    def read(self, slots: list[int], first: int, count: int) -> list[int]:
        """The slots at eviction positions [first, first + count), in eviction order."""
        raise NotImplementedError

    def take(self, slots: list[int], first: int, count: int) -> list[int]:
        """`read`, leaving -1 (no slot) in their place."""
        taken = self.read(slots, first, count)
        slots[self.indices(len(slots), first, first + count)] = [-1] * count
        return taken

    def put(self, slots: list[int], first: int, values: list[int]) -> None:
        """Write `values` (in eviction order) at eviction positions first, first + 1, ..."""
        raise NotImplementedError


class Leading(EvictionOrder):
    """Position p is chunk p: the earliest tokens go first, and dropped tokens form a leading run."""

    def index(self, n: int, position: int) -> int:
        return position

    def indices(self, n: int, first: int, end: int) -> slice:
        return slice(first, end)

    def read(self, slots: list[int], first: int, count: int) -> list[int]:
        return slots[first:first + count]

    def take(self, slots: list[int], first: int, count: int) -> list[int]:
        taken = slots[first:first + count]
        slots[first:first + count] = [-1] * count
        return taken

    def put(self, slots: list[int], first: int, values: list[int]) -> None:
        slots[first:first + len(values)] = values


class Trailing(EvictionOrder):
    """Position p is chunk n-1-p: the latest tokens go first, and only a kept prefix is reused."""

    trailing = True

    def index(self, n: int, position: int) -> int:
        return n - 1 - position

    def indices(self, n: int, first: int, end: int) -> slice:
        return slice(n - end, n - first)

    def read(self, slots: list[int], first: int, count: int) -> list[int]:
        n = len(slots)
        taken = slots[n - first - count:n - first]
        taken.reverse()
        return taken

    def put(self, slots: list[int], first: int, values: list[int]) -> None:
        n = len(slots)
        slots[n - first - len(values):n - first] = values[::-1]


def computed_tokens(chunks: slice, chunk_tokens: int, kv_tokens: int) -> int:
    """Computed tokens in a slice of a conversation's chunks (of `kv_tokens` computed in all): only
    its last chunk may be partial."""
    return min(chunks.stop * chunk_tokens, kv_tokens) - min(chunks.start * chunk_tokens, kv_tokens)


LEADING = Leading()
TRAILING = Trailing()


def order_of(policy) -> EvictionOrder:
    """The eviction order a policy declares (`order = "leading"` or `"trailing"`)."""
    return TRAILING if policy.order == "trailing" else LEADING
