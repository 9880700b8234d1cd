"""The definition of equivalence in each precision, tested on the CPU in bf16, fp16 and fp32: pensieve
under forced swaps and drops against stateless recompute, and the definition's own refusals."""

from __future__ import annotations

import pytest
import torch

from executor.equivalence import compare, tolerance
from executor.models import load_model
from tests.executor.test_engine import TINY_CACHES, TINY_WORKLOAD, serve, tiny_engine


def logits_by_context(loaded, policy: str, device_slots: int, host_slots: int) -> dict:
    engine = tiny_engine(loaded, policy, device_slots, host_slots)
    rows = {}

    def hook(request_ids, logits) -> None:
        for rid, row in zip(request_ids, logits):
            context = tuple(engine.conversation_ids(engine.requests[rid].conversation_id))
            rows[context] = row.float().clone()

    engine.logits_hook = hook
    served = serve(engine, TINY_WORKLOAD)
    assert served.events() >= {"swap_out", "swap_in"} or policy == "stateless"
    return rows


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_pensieve_under_swaps_and_drops_is_equivalent_to_stateless_in_each_precision(dtype) -> None:
    loaded = load_model("random:tiny-llama", "cpu", dtype)
    reference = logits_by_context(loaded, "stateless", 64, 0)
    candidate = logits_by_context(loaded, "pensieve", *TINY_CACHES[1])
    verdict = compare(reference, candidate, dtype)
    assert verdict.ok, verdict.failures[:3]
    assert verdict.compared >= len(reference) // 2  # a near-tie flip may part a conversation, not most
    if dtype == "float32":
        assert verdict.near_tie_flips == 0 and verdict.compared == len(reference)


def test_the_definition_refuses_differences_beyond_its_tolerance_and_clear_flips() -> None:
    ref = torch.tensor([3.0, 1.0, 0.5])
    tol = tolerance("bfloat16", ref)
    assert compare({"c": ref}, {"c": ref + tol / 2}, "bfloat16").ok
    assert not compare({"c": ref}, {"c": ref + torch.tensor([0.0, 2 * tol, 0.0])}, "bfloat16").ok
    near = torch.tensor([3.0, 3.0 - tol, 0.5])  # a near tie: a flip is allowed in half precision ...
    flipped = torch.tensor([3.0 - tol / 2, 3.0 - tol / 2 + 1e-3, 0.5])
    verdict = compare({"c": near}, {"c": flipped}, "bfloat16")
    assert verdict.ok and verdict.near_tie_flips == 1
    assert not compare({"c": near}, {"c": flipped}, "float32").ok  # ... never in fp32
    clear = compare({"c": ref}, {"c": torch.tensor([1.0, 3.0, 0.5])}, "bfloat16")  # a clear margin
    assert not clear.ok and "instead of" in " ".join(clear.failures)
    assert not compare({"c": ref}, {"other": ref}, "float32").ok  # nothing compared proves nothing
    with pytest.raises(ValueError, match="float8"):
        tolerance("float8", ref)
