"""Paged KV storage in two tiers: chunk slots on the device and in host memory."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from executor.host_tier import HostTier, available_memory

NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}  # bfloat16: numpy has none


def _runs(pairs: Iterable[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Coalesce (src, dst) slot pairs into (src, dst, count) runs where both sides are consecutive."""
    runs: list[tuple[int, int, int]] = []
    for src, dst in pairs:
        if runs and src == runs[-1][0] + runs[-1][2] and dst == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((src, dst, 1))
    return runs


@dataclass(frozen=True)
class CopyOp:
    """One entry of a step's copy order: copy `runs` (src, dst, count) of `kind` for one layer (None: all
    of them), or record an event ("event") once everything before it is done."""

    kind: str  # "out" (urgent swap-out), "in" (swap-in), "ahead" (ahead-of-time swap-out), "event"
    layer: int | None
    runs: tuple[tuple[int, int, int], ...] = ()

    @property
    def index(self) -> int | slice:
        return slice(None) if self.layer is None else self.layer


def copy_order(layers: int, urgent_out: list, swap_in: list, ahead_out: list) -> list[CopyOp]:
    """The order a step's copies are issued in, one stream: layer by layer, the urgent swap-outs (whose
    device slots a swap-in or the forward refills), the swap-ins, then an event the forward's layer
    waits on; after every layer, the ahead-of-time swap-outs of all layers and their event.

    Layer 0's attention thus waits only for layer 0's own copies, not for every swap-out of the step.
    With no urgent swap-outs and no swap-ins there are no layer events (nothing to wait for)."""
    order: list[CopyOp] = []
    if urgent_out or swap_in:
        for layer in range(layers):
            if urgent_out:
                order.append(CopyOp("out", layer, tuple(urgent_out)))
            if swap_in:
                order.append(CopyOp("in", layer, tuple(swap_in)))
            order.append(CopyOp("event", layer))
    if ahead_out:
        order.append(CopyOp("ahead", None, tuple(ahead_out)))
        order.append(CopyOp("event", None))
    return order


def check_memory(what: str, nbytes: int) -> None:
    """Refuse, before torch tries, a host allocation larger than the memory available."""
    free = available_memory()
    if free is not None and nbytes > free:
        raise ValueError(f"{what}: the KV tiers need {nbytes / 1e9:.3g} GB of host memory but only "
                         f"{free / 1e9:.3g} GB is available; make the tiers smaller")


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On the CPU through calloc (numpy's zeros), which maps fresh pages that the kernel
    zeroes when first touched, rather than writing every byte up front: a 1 GB device tier then
    costs nothing at start-up (torch.zeros: ~1 s here) and only the slots used are ever touched."""
    if device.type == "cpu" and dtype in NUMPY_DTYPES:
        return torch.from_numpy(np.zeros(shape, dtype=NUMPY_DTYPES[dtype]))
    return torch.zeros(shape, dtype=dtype, device=device)


class PagedKVStore:
    """KV cache slots of `chunk_tokens` tokens each, in a device pool and a host pool.

    Both pools are layer-major so one layer's KV can move and be attended to on its own:
    `device_pool`: [layers, device_slots, 2, chunk_tokens, kv_heads, head_dim] (index 0 of dim 2 is K, 1 is V),
    `host`: the host tier, [layers, host_slots, 2, chunk_tokens, kv_heads, head_dim] in pieces of at most
    1 GiB (executor/host_tier.py), pinned on CUDA; `host_pool` is it as one tensor when it is one piece.
    On CUDA, copies run on a separate stream and record one event per layer; the attention of a
    layer calls `wait_layer` so it starts only when that layer's copies are done. Anything else
    that touches slots involved in a copy must call `synchronize` first. On CPU a copy is a plain
    copy and `wait_layer` does nothing.
    """

    def __init__(
        self,
        device_slots: int,
        host_slots: int,
        layers: int,
        kv_heads: int,
        head_dim: int,
        chunk_tokens: int = 32,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        assert device_slots >= 0 and host_slots >= 0 and chunk_tokens > 0
        self.device = torch.device(device)
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.chunk_tokens, self.dtype = chunk_tokens, dtype
        self.device_slots, self.host_slots = device_slots, host_slots
        on_cuda = self.device.type == "cuda"
        chunk_shape = (2, chunk_tokens, kv_heads, head_dim)
        chunk_bytes = layers * 2 * chunk_tokens * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
        check_memory("KV tiers (cache.device_gb and host_gb, or --gpu-cache and --cpu-cache)", host_slots * chunk_bytes
                     + (0 if on_cuda else device_slots * chunk_bytes))
        # Zero-filled: a padded gather may read slots never written, and a masked-out NaN still poisons softmax @ V.
        self.device_pool = zeroed((layers, device_slots, *chunk_shape), dtype, self.device)
        self.host = HostTier(layers, host_slots, chunk_shape, dtype, pin=on_cuda)  # in pieces, pinned on CUDA
        self._copy_stream = torch.cuda.Stream(self.device) if on_cuda else None
        self._layer_events: list[Any] = [None] * layers
        self._ahead_done: Any = None  # CUDA event after the last step's ahead-of-time copies

    @classmethod
    def for_model(
        cls, dims: dict[str, Any], device_slots: int, host_slots: int, chunk_tokens: int = 32,
        device: str | torch.device = "cpu",
    ) -> PagedKVStore:
        """A store shaped for a model's `dims` (as in `LoadedModel.dims`)."""
        dtype = getattr(torch, dims["dtype"])
        return cls(device_slots, host_slots, dims["layers"], dims["kv_heads"], dims["head_dim"], chunk_tokens,
                   dtype, device)

    @property
    def host_pool(self) -> torch.Tensor:
        """The host tier as one tensor, when it is one piece (small tiers: tests, the profiler)."""
        if len(self.host.pieces) != 1:
            raise ValueError(f"the host tier is in {len(self.host.pieces)} pieces; use store.host")
        return self.host.pieces[0]

    @property
    def decode_bytes_per_token(self) -> int:
        """Bytes of one token's K and V in one layer: what a gather copies per token and layer."""
        return 2 * self.kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_chunk(self) -> int:
        """Bytes of one chunk slot, K and V of all layers: 2 x layers x chunk x kv_heads x head_dim x itemsize."""
        return 2 * self.layers * self.chunk_tokens * self.kv_heads * self.head_dim * self.dtype.itemsize

    def swap_out(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy chunks device -> host, all layers, for each (device_slot, host_slot) pair."""
        self.copy_step(pairs, (), ())

    def swap_in(self, pairs: Sequence[tuple[int, int]]) -> list[Any] | None:
        """Copy chunks host -> device, layer by layer, for each (host_slot, device_slot) pair.

        Returns the per-layer CUDA events the attention waits on (None on CPU, where the copy is done).
        """
        return self.copy_step((), pairs, ())

    def copy_step(self, urgent_out: Sequence[tuple[int, int]], swap_in: Sequence[tuple[int, int]],
                  ahead_out: Sequence[tuple[int, int]] = ()) -> list[Any] | None:
        """A step's copies in `copy_order`: per layer, the swap-outs whose device slots this step refills,
        then that layer's swap-ins, then the layer's event; the ahead-of-time swap-outs last, so that
        they never delay a layer the forward waits for. Returns the per-layer events (None on CPU)."""
        order = copy_order(self.layers, _runs(urgent_out), _runs(swap_in), _runs(ahead_out))
        if self._copy_stream is None:
            for op in order:
                self._copy_op(op, non_blocking=False)
            return None
        return self._issue_cuda(order)

    def _copy_op(self, op: CopyOp, non_blocking: bool) -> None:
        """One copy entry, its runs split where they cross from one host piece to the next, issued in one
        call (`torch._foreach_copy_`): a layer's copies in one direction cost one Python call, not one
        per run, and still run in stream order as separate copies straight between host and device
        slots (no staging buffer, no host-side scatter waiting on a transfer)."""
        if op.kind == "event":
            return
        inward = op.kind == "in"
        sources, targets = [], []
        for piece, s, d, n in self.host.split(list(op.runs), host_is_source=inward):
            host = self.host.pieces[piece]
            src, dst = (host, self.device_pool) if inward else (self.device_pool, host)
            sources.append(src[op.index, s:s + n])
            targets.append(dst[op.index, d:d + n])
        if targets:
            torch._foreach_copy_(targets, sources, non_blocking=non_blocking)

    def _issue_cuda(self, order: list[CopyOp]) -> list[Any] | None:
        stream = self._copy_stream
        current = torch.cuda.current_stream(self.device)
        if self._ahead_done is not None:
            # The last step's ahead-of-time copies read slots this step may refill.
            current.wait_event(self._ahead_done)
            self._ahead_done = None
        if not order:
            return None
        # Earlier forwards may still read or write these slots on the compute stream.
        stream.wait_stream(current)
        events: list[Any] = []
        with torch.cuda.stream(stream):
            for op in order:
                if op.kind == "event":
                    event = torch.cuda.Event()
                    event.record(stream)
                    if op.layer is None:
                        self._ahead_done = event
                    else:
                        events.append(event)
                    continue
                self._copy_op(op, non_blocking=True)
        if events:
            self._layer_events = events
        return events or None

    def wait_layer(self, layer: int) -> None:
        """Make the compute stream wait until this layer's pending copies are done (no-op on CPU)."""
        event = self._layer_events[layer]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            self._layer_events[layer] = None

    def synchronize(self) -> None:
        """Block until all copies finished, e.g. before the host reads `host_pool`."""
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
