"""A KV tier larger than the memory available is refused before torch allocates it."""
import pytest

from executor.kv_store import PagedKVStore, available_memory


def test_a_host_tier_past_the_free_memory_is_a_clear_error():
    free = available_memory()
    if free is None:
        pytest.fail("/proc/meminfo has no MemAvailable on this machine")
    slots = free // 8 + 1  # 8 bytes a slot below: one slot past what is free
    with pytest.raises(ValueError, match=r"need .* GB of host memory but only .* GB is available"):
        PagedKVStore(device_slots=1, host_slots=slots, layers=1, kv_heads=1, head_dim=1, chunk_tokens=1)
