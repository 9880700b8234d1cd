"""The host tier of the KV cache, allocated in pieces.

One pinned allocation of the whole tier (160 GB in the paper's scenarios) is slow, all or nothing,
and fails past free memory or the memlock limit with an error that names neither. The tier is
allocated in pieces of at most PIECE_BYTES, with a progress bar when there are many, and a failed
piece stops with the size asked, what was allocated and the limits met. A slot lives in one piece
(slot // slots_per_piece); copies are split where a run of slots crosses from one piece to the next.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator

import torch
from tqdm import tqdm

PIECE_BYTES = 1 << 30
PROGRESS_PIECES = 8  # a progress bar from this many pieces on


def available_memory() -> int | None:
    """Bytes of memory available to allocate now (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memlock_limit() -> int | None:
    """Bytes this process may pin (RLIMIT_MEMLOCK); None when unlimited or unknown."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    except (OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


class HostTier:
    """`slots` chunk slots [layers, slots, *chunk_shape] in pieces; pinned when `pin`."""

    def __init__(self, layers: int, slots: int, chunk_shape: tuple[int, ...], dtype: torch.dtype, pin: bool,
                 piece_bytes: int | None = None) -> None:
        piece_bytes = PIECE_BYTES if piece_bytes is None else piece_bytes
        slot_bytes = layers * dtype.itemsize
        for size in chunk_shape:
            slot_bytes *= size
        self.slots, self.pinned = slots, pin
        self.slots_per_piece = max(1, piece_bytes // max(1, slot_bytes))
        counts = [min(self.slots_per_piece, slots - start) for start in range(0, slots, self.slots_per_piece)]
        self.pieces: list[torch.Tensor] = []
        with tqdm(total=slots * slot_bytes / 1e9, unit="GB", desc="host tier", disable=len(counts) < PROGRESS_PIECES,
                  bar_format="{desc}: {n:.1f}/{total:.1f} GB") as bar:
            for count in counts:
                try:
                    # Left unfilled: a host slot is only read by a swap-in after a swap-out wrote all of it.
                    self.pieces.append(torch.empty((layers, count, *chunk_shape), dtype=dtype, pin_memory=pin))
                except RuntimeError as exc:
                    done = sum(p.numel() for p in self.pieces) * dtype.itemsize
                    free, lock = available_memory(), memlock_limit()
                    limits = [f"{free / 1e9:.3g} GB available" if free is not None else None,
                              f"a memlock limit of {lock / 1e9:.3g} GB (ulimit -l)" if pin and lock is not None
                              else None]
                    raise ValueError(
                        f"host tier: allocating {slots * slot_bytes / 1e9:.3g} GB{' pinned' if pin else ''} "
                        f"failed after {done / 1e9:.3g} GB ({exc}); limits: "
                        f"{', '.join(x for x in limits if x) or 'unknown'}; make the host tier smaller "
                        "(cache.host_gb or --cpu-cache)" + (" or raise the memlock limit" if pin else "")) from None
                bar.update(count * slot_bytes / 1e9)

    def locate(self, slot: int) -> tuple[int, int]:
        """(piece, offset in it) of a slot."""
        return divmod(slot, self.slots_per_piece)

    def split(self, runs: list[tuple[int, int, int]], host_is_source: bool) -> Iterator[tuple[int, int, int, int]]:
        """(piece, src, dst, count) runs, each within one piece on the host side (its index there local)."""
        for src, dst, count in runs:
            while count:
                host = src if host_is_source else dst
                piece, offset = self.locate(host)
                n = min(count, self.slots_per_piece - offset)
                yield (piece, offset, dst, n) if host_is_source else (piece, src, offset, n)
                src, dst, count = src + n, dst + n, count - n

    def slot(self, layer: int | slice, slot: int) -> torch.Tensor:
        """One slot's chunk in one layer (or all layers): [..., *chunk_shape], a view."""
        piece, offset = self.locate(slot)
        return self.pieces[piece][layer, offset]

    def gather(self, slots: list[int]) -> torch.Tensor:
        """Copies of some slots, all layers: [layers, len(slots), *chunk_shape] (tests, checks)."""
        return torch.stack([self.slot(slice(None), s) for s in slots], dim=1)

    def zero_(self) -> None:
        for piece in self.pieces:
            piece.zero_()
