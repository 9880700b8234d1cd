"""Decodes attended in groups of similar context length, each group's padded gather bounded: the
bound itself, and the answers of a half-precision engine (the path that gathers) against stateless."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import executor.attention as attention
from executor.attention import MAX_PADDING, decode_groups
from executor.equivalence import compare
from executor.models import load_model
from tests.executor.test_engine import Workload, random_prompts, serve, tiny_engine

CHUNK = 16


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=64), st.integers(1 << 10, 1 << 22))
def test_every_decode_is_in_one_group_and_no_group_pads_past_its_bounds(lengths, budget) -> None:
    decodes = [(i, [0] * -(-n // CHUNK), n) for i, n in enumerate(lengths)]
    groups = decode_groups(decodes, CHUNK, bytes_per_token=64, budget=budget)
    assert sorted(i for g in groups for i, _, _ in g) == list(range(len(lengths)))
    for g in groups:
        longest = max(n for _, _, n in g)
        gathered = len(g) * -(-longest // CHUNK) * CHUNK
        if len(g) > 1:  # a lone decode is its own context, whatever its size
            assert len(g) * longest <= MAX_PADDING * sum(n for _, _, n in g) and gathered * 64 <= budget


def test_one_long_decode_no_longer_pads_the_short_ones() -> None:
    decodes = [(0, [0] * 38, 600)] + [(i, [0, 0], 20) for i in range(1, 9)]
    groups = decode_groups(decodes, CHUNK, bytes_per_token=64)
    assert [len(g) for g in groups] == [1, 8]  # before: 9 x 608 padded tokens per layer, now 608 + 8 x 32


def test_half_precision_decodes_in_groups_answer_as_stateless(monkeypatch) -> None:
    monkeypatch.setattr(attention, "DECODE_GATHER_BYTES", 4096)  # groups of a few decodes at most
    loaded = load_model("random:tiny-llama", "cpu", "float16")
    workload = Workload(random_prompts([[90, 6], [12, 5], [40, 7], [8, 3]], seed=11), new_tokens=10,
                        starts=[0, 0, 0, 0])

    def logits(policy: str, device_slots: int) -> dict:
        engine = tiny_engine(loaded, policy, device_slots, 0)
        rows = {}

        def hook(request_ids, out) -> None:
            for rid, row in zip(request_ids, out):
                rows[tuple(engine.conversation_ids(engine.requests[rid].conversation_id))] = row.float().clone()
        engine.logits_hook = hook
        serve(engine, workload)
        return rows

    grouped = []
    original = attention.decode_groups
    monkeypatch.setattr(attention, "decode_groups", lambda *a, **k: grouped.append(g := original(*a, **k)) or g)
    verdict = compare(logits("stateless", 64), logits("pensieve-gpu", 64), "float16")
    assert verdict.ok, verdict.failures[:3]
    assert any(len(g) > 1 for g in grouped)  # some steps attended their decodes in several groups


def test_a_cuda_step_uses_a_fused_kernel_or_says_why_none_serves() -> None:
    from executor.attention import FUSED_BACKENDS, check_backend, first_backend

    tried = []

    def flash_refuses(name: str) -> None:
        tried.append(name)
        if name == "FLASH_ATTENTION":
            raise RuntimeError("No available kernel. Aborting execution.\nmore")

    assert first_backend(FUSED_BACKENDS, flash_refuses) == "EFFICIENT_ATTENTION"
    assert tried == ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"]

    def none_serve(name: str) -> None:
        raise RuntimeError(f"{name} does not take head size 96")

    with pytest.raises(ValueError, match="math kernel") as error:
        first_backend(FUSED_BACKENDS, none_serve)
    assert all(name in str(error.value) for name in FUSED_BACKENDS)
    assert check_backend(torch.float32, 4, 16, torch.device("cpu")) == "cpu"
