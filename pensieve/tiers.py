"""A tier of KV memory as a fixed number of chunk slots."""
from __future__ import annotations


# The most chunk slots a tier may have: each is a list entry in the core (a tier of 10^7 slots takes
# ~0.4 GB of this process's memory); a size past it is a typo (1e30 GB), not an experiment.
MAX_SLOTS = 10**7


class SlotPool:
    """Owns the free slots of one tier; reuse is last-freed-first so replays are deterministic."""

    __slots__ = ("name", "capacity", "free")

    def __init__(self, name: str, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"{name} tier: capacity must be >= 0 slots, got {capacity}")
        if capacity > MAX_SLOTS:
            raise ValueError(f"{name} tier: {capacity} slots is over the {MAX_SLOTS:.0e} a tier may hold")
        self.name = name
        self.capacity = capacity
        self.free: list[int] = list(range(capacity - 1, -1, -1))  # pop() yields slot 0 first

    @property
    def used(self) -> int:
        return self.capacity - len(self.free)

    def allocate(self) -> int:
        """A free slot, or -1 when the tier is full."""
        return self.free.pop() if self.free else -1

    def release(self, slot: int) -> None:
        assert 0 <= slot < self.capacity, (self.name, slot)
        self.free.append(slot)


def slots_for(gigabytes: float, bytes_per_chunk: int) -> int:
    """Chunk slots that fit in `gigabytes` (10^9 bytes)."""
    if gigabytes < 0:
        raise ValueError(f"cache size must be >= 0 GB, got {gigabytes}")
    return int(gigabytes * 1e9 // bytes_per_chunk)
