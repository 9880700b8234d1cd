"""A KV tier larger than the memory available is refused before torch allocates it."""
import pytest
import torch

from executor.kv_store import PagedKVStore, available_memory, zeroed


def test_a_host_tier_past_the_free_memory_is_a_clear_error():
    free = available_memory()
    if free is None:
        pytest.fail("/proc/meminfo has no MemAvailable on this machine")
    slots = free // 8 + 1  # 8 bytes a slot below: one slot past what is free
    with pytest.raises(ValueError, match=r"need .* GB of host memory but only .* GB is available"):
        PagedKVStore(device_slots=1, host_slots=slots, layers=1, kv_heads=1, head_dim=1, chunk_tokens=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_device_pool_starts_as_zeros_in_every_dtype(dtype) -> None:
    pool = zeroed((2, 3, 2, 4, 1, 8), dtype, torch.device("cpu"))
    assert pool.dtype == dtype and pool.shape == (2, 3, 2, 4, 1, 8) and not pool.any()
    pool[1, 2] = 1.0  # writable, and its own memory
    assert pool.sum().item() == 2 * 4 * 8
