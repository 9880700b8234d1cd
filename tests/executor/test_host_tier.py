"""The host tier in pieces: slots across piece boundaries copy like one tensor, and an allocation that
fails says how much was asked, how much it got and which limits stood."""

from __future__ import annotations

import pytest
import torch

import executor.host_tier as host_tier
from executor.host_tier import HostTier
from executor.kv_store import PagedKVStore


def test_runs_crossing_pieces_copy_as_into_one_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    slot_bytes = 2 * 2 * 4 * 1 * 2 * 4  # layers x K/V x chunk x kv_heads x head_dim x fp32
    monkeypatch.setattr(host_tier, "PIECE_BYTES", 3 * slot_bytes)  # 3 slots per piece: 10 slots in 4 pieces
    store = PagedKVStore(12, 10, layers=2, kv_heads=1, head_dim=2, chunk_tokens=4, dtype=torch.float32)
    assert [p.shape[1] for p in store.host.pieces] == [3, 3, 3, 1]
    store.device_pool.copy_(torch.randn_like(store.device_pool))
    before = store.device_pool.clone()
    out = [(d, h) for d, h in zip(range(1, 11), range(10))]  # one run over every piece boundary
    store.swap_out(out)
    assert torch.equal(store.host.gather(list(range(10))), before[:, 1:11])
    store.device_pool.zero_()
    store.swap_in([(h, d) for d, h in out][::-1])  # back, in reverse order
    assert torch.equal(store.device_pool[:, 1:11], before[:, 1:11])
    with pytest.raises(ValueError, match="4 pieces"):
        store.host_pool


def test_a_failed_piece_names_the_size_asked_what_it_got_and_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    real_empty = torch.empty
    made = []

    def empty(*args, **kwargs):
        if len(made) == 2:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        made.append(1)
        return real_empty(*args, **{k: v for k, v in kwargs.items() if k != "pin_memory"})

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(host_tier, "memlock_limit", lambda: 64 << 20)
    with pytest.raises(ValueError) as error:
        HostTier(2, 100, (2, 4, 1, 2), torch.float32, pin=True, piece_bytes=10 * 128)
    message = str(error.value)
    assert "allocating 1.28e-05 GB pinned" in message and "after 2.56e-06 GB" in message  # 2 of 10 pieces
    assert "memlock limit of 0.0671 GB" in message and "--cpu-cache" in message and "ulimit -l" in message
