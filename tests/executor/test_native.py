"""The C decode kernel must match SDPA over the gathered KV; the torch fallback must stay correct too."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import executor.attention as attention
from executor import native
from executor.cpu import ThreadGovernor, fixed_threads, serving_threads, torch_threads, tune_allocator
from executor.models import LoadedModel
from tests.executor.test_runner import (CHUNK, Conversation, Slots, assert_close, make_runner, random_tokens,
                                        stateless_logits)

needs_kernel = pytest.mark.skipif(native.decode_kernel() is None, reason="no C compiler: the torch path serves")


def reference(pool: torch.Tensor, chunks: torch.Tensor, kv_lens: torch.Tensor, q: torch.Tensor,
              scale: float) -> torch.Tensor:
    """Each sequence on its own: its chunks gathered, K/V heads repeated, plain SDPA."""
    _, _, chunk, kv_heads, head_dim = pool.shape
    groups = q.shape[1] // kv_heads
    rows = []
    for i, kv_len in enumerate(kv_lens.tolist()):
        used = chunks[i, : -(-kv_len // chunk)]
        k = pool[used, 0].reshape(-1, kv_heads, head_dim)[:kv_len].transpose(0, 1).repeat_interleave(groups, 0)
        v = pool[used, 1].reshape(-1, kv_heads, head_dim)[:kv_len].transpose(0, 1).repeat_interleave(groups, 0)
        rows.append(F.scaled_dot_product_attention(q[i][:, None], k, v, scale=scale)[:, 0])
    return torch.stack(rows)


@needs_kernel
@pytest.mark.parametrize("head_dim", [8, 24, 64, 128])
@pytest.mark.parametrize("groups", [1, 3, 4])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_sdpa(head_dim: int, groups: int, threads: int) -> None:
    gen = torch.Generator().manual_seed(head_dim * 10 + groups)
    slots, chunk, kv_heads = 64, 8, 2
    pool = torch.randn(slots, 2, chunk, kv_heads, head_dim, generator=gen) * 3
    kv_lens = torch.tensor([1, 7, 8, 9, 33, 61])  # one token, partial and whole chunks
    max_chunks = 8
    chunks = torch.randperm(slots, generator=gen)[: len(kv_lens) * max_chunks].view(len(kv_lens), max_chunks)
    q = torch.randn(len(kv_lens), kv_heads * groups, head_dim, generator=gen)
    scale = head_dim**-0.5
    with torch_threads(threads):
        got = native.paged_decode(pool, chunks.contiguous(), kv_lens, q, scale)
    torch.testing.assert_close(got, reference(pool, chunks, kv_lens, q, scale), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_kernel_survives_large_scores() -> None:
    """Scores far apart (softmax underflow for all but one key) stay finite and exact."""
    pool = torch.zeros(4, 2, 8, 1, 8)
    pool[:, 0, :, 0, 0] = torch.arange(32.0).view(4, 8) * 50  # K: score 0 .. 1550 x q
    pool[:, 1] = torch.randn(4, 8, 1, 8)
    q = torch.zeros(1, 1, 8)
    q[0, 0, 0] = 1.0
    chunks, kv_lens = torch.tensor([[2, 0, 3, 1]]), torch.tensor([29])
    got = native.paged_decode(pool, chunks, kv_lens, q, 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference(pool, chunks, kv_lens, q, 1.0))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_torch_decode_path_matches_the_kernel_path(preset: str, tiny_model: Callable[[str], LoadedModel],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed decode lengths through the runner with and without the kernel; both equal stateless logits."""
    loaded = tiny_model(preset)
    results = []
    for use_kernel in (True, False):
        if not use_kernel:
            monkeypatch.setattr(attention, "_native_decode", lambda pool, q: False)
        runner, _ = make_runner(loaded)
        slots = Slots(64, seed=11)
        convs = [Conversation(random_tokens(n, seed=n), CHUNK) for n in (3, 17, 40)]
        first = runner.forward([c.query(range(len(c.tokens)), slots) for c in convs])
        for conv, row in zip(convs, first):
            conv.tokens.append(int(row.argmax()))
        logits = runner.forward([c.decode_query(slots) for c in convs])
        for conv, row in zip(convs, logits):
            assert_close(row, stateless_logits(loaded.model, conv.tokens)[-1])
        results.append(logits)
    assert_close(results[0], results[1])


def test_threads_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tune_allocator() in (True, False)
    monkeypatch.setenv("PENSIEVE_THREADS", "3")
    assert serving_threads({"hidden_size": 576}) == 3
    monkeypatch.setenv("PENSIEVE_THREADS", "zero")
    with pytest.raises(ValueError, match="PENSIEVE_THREADS"):
        serving_threads()
    monkeypatch.delenv("PENSIEVE_THREADS")
    assert serving_threads({"hidden_size": 64}) == 1
    assert serving_threads({"hidden_size": 576}) >= 1
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


def test_thread_governor_leaves_busy_cores_alone() -> None:
    governor = ThreadGovernor(cores=2)
    assert governor.choose(None) == 2  # nothing known: every core
    assert governor.choose(0.0) == 2 and governor.choose(0.4) == 2
    assert governor.choose(0.7) == 1 and governor.choose(1.0) == 1 and governor.choose(5.0) == 1
    assert ThreadGovernor(cores=8).choose(2.2) == 6
    with torch_threads(None):
        threads = governor.start(probe_s=0.05)
        assert 1 <= threads <= 2 and torch.get_num_threads() == threads
        governor.step_done()
        assert sum(governor.steps.values()) == 1


def test_thread_governor_forgets_what_happened_while_the_engine_idled(monkeypatch: pytest.MonkeyPatch) -> None:
    governor = ThreadGovernor(cores=2, interval_s=0.0)
    busy = iter([1.5, 0.0])  # others kept 1.5 cores busy while the engine waited, then nothing
    monkeypatch.setattr(governor, "others_busy", lambda: next(busy))
    with torch_threads(None):
        governor.step_done()
        assert torch.get_num_threads() == 1  # it yields to the busy process
        governor.resume()  # the engine waited; work came back
        assert torch.get_num_threads() == 2  # every core, until the next measurement says otherwise
        governor.step_done()
        assert torch.get_num_threads() == 2


def test_fixed_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PENSIEVE_THREADS", raising=False)
    assert fixed_threads({"hidden_size": 576}) is None  # the governor decides
    assert fixed_threads({"hidden_size": 64}) == 1
    monkeypatch.setenv("PENSIEVE_THREADS", "2")
    assert fixed_threads({"hidden_size": 64}) == 2
