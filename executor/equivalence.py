"""What "equal to stateless recompute" means in each precision.

- fp32: the same greedy tokens, and logits within 1e-4 or 64 units in the last place of the largest
  reference logit, whichever is larger (the tiny models' logits are ~3, SmolLM2's ~30: a fixed 1e-4
  held for the first and failed the second by summation order alone, 1.2e-4 over 30 layers).
- fp16 / bf16: the order of floating-point sums depends on the batch's shape (which sequences share
  a step, how a context is split into chunks), and half precision rounds each sum coarsely, so two
  correct runs give slightly different logits and may break a near tie differently. The check:
  at every step whose context both runs reached, the logits agree within
  `HALF_ULPS` x the dtype's epsilon x the largest reference logit (at least 1), and the greedy
  tokens agree wherever the reference's top-2 margin exceeds twice that tolerance. A token that
  differs at a near tie is allowed; the two conversations then part, and what follows is not
  comparable (it is counted, not checked).

Measured on this CPU under forced swaps, drops and a suspension: on the tiny random Llama, bf16
logits differed by at most 0.027 (about 2 units in the last place at logits of 3.4), fp16 by
0.0039, fp32 by 2.4e-6; on SmolLM2-135M in fp32, by 1.2e-4 (`pensieve selfcheck`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import torch

FP32_ATOL = 1e-4
FP32_ULPS = 64
HALF_ULPS = 8
EPSILON = {"float32": torch.finfo(torch.float32).eps, "float16": torch.finfo(torch.float16).eps,
           "bfloat16": torch.finfo(torch.bfloat16).eps}


def tolerance(dtype: str, reference: torch.Tensor) -> float:
    """The largest logit difference allowed at one step, given the reference's logits there."""
    if dtype not in EPSILON:
        raise ValueError(f"no equivalence is defined for dtype {dtype!r}; allowed: float32, float16, bfloat16")
    scale = max(1.0, float(reference.abs().max()))
    if dtype == "float32":
        return max(FP32_ATOL, FP32_ULPS * EPSILON[dtype] * scale)
    return HALF_ULPS * EPSILON[dtype] * scale


@dataclass
class Verdict:
    dtype: str
    compared: int = 0  # steps whose context both runs reached
    max_difference: float = 0.0
    near_tie_flips: int = 0  # steps where the tokens differ at a near tie (half precision only)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and self.compared > 0

    def summary(self) -> str:
        state = "equivalent" if self.ok else f"NOT equivalent ({len(self.failures)} failures)"
        return (f"{state} in {self.dtype}: {self.compared} steps compared, largest logit difference "
                f"{self.max_difference:.3g}, {self.near_tie_flips} near-tie flips")


def compare(reference: Mapping[Hashable, torch.Tensor], candidate: Mapping[Hashable, torch.Tensor],
            dtype: str) -> Verdict:
    """Check `candidate` against `reference`: each maps a context (e.g. the tuple of token ids a step
    predicts after) to that step's logits [vocab]. Contexts only one run reached are skipped."""
    verdict = Verdict(dtype)
    for context, ref in reference.items():
        got = candidate.get(context)
        if got is None:
            continue
        ref, got = ref.float(), got.float()
        verdict.compared += 1
        tol = tolerance(dtype, ref)
        difference = float((ref - got).abs().max())
        verdict.max_difference = max(verdict.max_difference, difference)
        if difference > tol:
            verdict.failures.append(f"logits differ by {difference:.3g} > {tol:.3g} after {len(context)} tokens")
        ref_token, got_token = int(ref.argmax()), int(got.argmax())
        if ref_token != got_token:
            margin = float(ref[ref_token] - ref[got_token])
            if dtype != "float32" and margin <= 2 * tol:
                verdict.near_tie_flips += 1
            else:
                verdict.failures.append(f"token {got_token} instead of {ref_token} at a margin of {margin:.3g} "
                                        f"after {len(context)} tokens")
    return verdict
