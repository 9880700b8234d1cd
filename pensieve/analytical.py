"""Roofline profiles: cost tables computed from a device's peak FLOP/s and bandwidths, without torch.

Every operation takes max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth): the time an ideal
kernel needs. Used for GPUs nobody here can run (published datasheet figures) and for this CPU (figures
the profiler measures). The model and its assumptions are spelled out in profiles/README.md.
"""
from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass, field

import numpy as np

from .models import ModelSpec, shard

# Kernels per transformer layer in an eager forward (2 norms, q/k/v/o projections, rotary or bias adds,
# attention, gate/up/down or fc1/fc2, activation, 2 residual adds): each pays one launch or dispatch.
KERNELS_PER_LAYER = 14


@dataclass(frozen=True)
class Roofline:
    """A device as a roofline: peak compute per dtype, memory and host-link bandwidths, and their sources."""

    name: str
    description: str
    peak_flops: dict[str, float]  # dtype -> dense FLOP/s
    memory_bandwidth: float  # bytes/s of device memory
    link_bandwidth: float  # bytes/s of host <-> device copies (effective, one direction)
    compute_efficiency: float  # fraction of peak FLOP/s a good kernel sustains
    memory_efficiency: float  # fraction of memory bandwidth a good kernel sustains
    launch_s: float  # fixed cost of one kernel launch (or op dispatch on a CPU)
    overlap_copies: bool  # whether host copies run beside compute (a copy engine) or stall it
    sources: tuple[str, ...] = field(default=())
    # GPU-to-GPU links for tensor parallelism: an all-reduce's bus bandwidth (bytes/s per GPU, what NCCL's
    # busbw reports) and its fixed latency. 0: no interconnect (one device only).
    interconnect: str = ""
    interconnect_bandwidth: float = 0.0
    interconnect_latency_s: float = 0.0

    def flops(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise ValueError(
                f"roofline {self.name}: no peak FLOP/s for dtype {dtype!r}; known: {sorted(self.peak_flops)}"
            )
        return self.peak_flops[dtype] * self.compute_efficiency

    @property
    def bandwidth(self) -> float:
        return self.memory_bandwidth * self.memory_efficiency

    def to_dict(self) -> dict:
        return {
            "roofline": self.name,
            "description": self.description,
            "peak_tflop_s": {dtype: _round(flops / 1e12) for dtype, flops in self.peak_flops.items()},
            "memory_bandwidth_gb_s": _round(self.memory_bandwidth / 1e9),
            "link_bandwidth_gb_s": _round(self.link_bandwidth / 1e9),
            "compute_efficiency": self.compute_efficiency,
            "memory_efficiency": self.memory_efficiency,
            "launch_s": _round(self.launch_s),
            "kernels_per_layer": KERNELS_PER_LAYER,
            **({"interconnect": self.interconnect,
                "interconnect_bus_bandwidth_gb_s": _round(self.interconnect_bandwidth / 1e9),
                "interconnect_latency_s": _round(self.interconnect_latency_s)} if self.interconnect_bandwidth else {}),
            "sources": list(self.sources),
        }


def _round(x: float) -> float:
    """Four significant digits: what a table point means, and diffs stay readable."""
    return float(f"{x:.4g}")


# Efficiencies are assumptions, not datasheet figures: large fp16 GEMMs and FlashAttention-2 forward
# kernels sustain roughly 60-80% of tensor peak, and streaming kernels about 85% of HBM bandwidth.
_GPU_EFFICIENCY = dict(compute_efficiency=0.7, memory_efficiency=0.85, launch_s=5e-6, overlap_copies=True)

GPUS: dict[str, Roofline] = {
    "a100-80gb": Roofline(
        name="a100-80gb",
        description="NVIDIA A100 80GB SXM4, PCIe 4.0 x16 host link",
        peak_flops={"float16": 312e12, "bfloat16": 312e12},
        memory_bandwidth=2039e9,
        link_bandwidth=25e9,
        sources=(
            "NVIDIA A100 Tensor Core GPU datasheet (2021): FP16/BF16 Tensor Core 312 TFLOPS dense, "
            "HBM2e 2,039 GB/s (80GB SXM)",
            "PCIe 4.0 x16: 32 GB/s per direction raw; ~25 GB/s effective for pinned cudaMemcpyAsync "
            "(assumed, typical bandwidthTest figure)",
            "NVLink 3 through NVSwitch (HGX A100): 600 GB/s per GPU both directions, 300 GB/s each way; an "
            "all-reduce's bus bandwidth taken as 80% of that (240 GB/s) and 10 us fixed latency (assumed)",
        ),
        interconnect="NVLink 3 (NVSwitch)",
        interconnect_bandwidth=240e9,
        interconnect_latency_s=10e-6,
        **_GPU_EFFICIENCY,
    ),
    "h100-80gb": Roofline(
        name="h100-80gb",
        description="NVIDIA H100 80GB SXM5, PCIe 5.0 x16 host link",
        peak_flops={"float16": 989e12, "bfloat16": 989e12},
        memory_bandwidth=3350e9,
        link_bandwidth=50e9,
        sources=(
            "NVIDIA H100 Tensor Core GPU datasheet (2023): FP16/BF16 Tensor Core 1,979 TFLOPS with sparsity, "
            "989 TFLOPS dense (SXM); HBM3 3.35 TB/s",
            "PCIe 5.0 x16: 64 GB/s per direction raw; ~50 GB/s effective for pinned copies (assumed)",
            "NVLink 4 through NVSwitch (HGX H100): 900 GB/s per GPU both directions, 450 GB/s each way; an "
            "all-reduce's bus bandwidth taken as 80% of that (360 GB/s) and 10 us fixed latency (assumed)",
        ),
        interconnect="NVLink 4 (NVSwitch)",
        interconnect_bandwidth=360e9,
        interconnect_latency_s=10e-6,
        **_GPU_EFFICIENCY,
    ),
}


def layer_matrices(spec: ModelSpec) -> list[tuple[int, int]]:
    """(in, out) of every weight matrix in one layer, as the forward multiplies them."""
    h, q_dim, kv_dim = spec.hidden_size, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    attention = [(h, q_dim), (h, kv_dim), (h, kv_dim), (q_dim, h)]
    if spec.architecture in ("gpt2", "opt"):
        return attention + [(h, spec.intermediate_size), (spec.intermediate_size, h)]
    return attention + [(h, spec.intermediate_size)] * 2 + [(spec.intermediate_size, h)]  # gate, up, down


def param_count(spec: ModelSpec) -> int:
    """Weights of the model, counting an untied LM head (an upper bound for memory checks)."""
    per_layer = sum(i * o for i, o in layer_matrices(spec))
    positions = spec.max_context * spec.hidden_size if spec.architecture in ("gpt2", "opt") else 0
    return spec.layers * per_layer + 2 * spec.vocab_size * spec.hidden_size + positions


def _matmul_s(roof: Roofline, spec: ModelSpec, rows: int, k: int, n: int) -> float:
    """[rows, k] @ [k, n]: compute-bound for many rows, weight-read-bound for few."""
    b = spec.dtype_bytes
    return max(2 * rows * k * n / roof.flops(spec.dtype), (k * n + rows * (k + n)) * b / roof.bandwidth)


def non_attention_s(spec: ModelSpec, roof: Roofline, tokens: int, sequences: int = 1) -> float:
    """Everything but attention for `tokens` query tokens of `sequences` sequences (one logits row each)."""
    per_layer = sum(_matmul_s(roof, spec, tokens, i, o) for i, o in layer_matrices(spec))
    # Norms, activation and residual adds stream each token's hidden and intermediate vectors a few times.
    elementwise = tokens * (8 * spec.hidden_size + 3 * spec.intermediate_size) * spec.dtype_bytes / roof.bandwidth
    lm_head = _matmul_s(roof, spec, sequences, spec.hidden_size, spec.vocab_size)
    return spec.layers * (per_layer + elementwise) + lm_head


def attention_s(spec: ModelSpec, roof: Roofline, query_tokens: int, kv_len: int) -> float:
    """One sequence's attention, all layers: `query_tokens` new tokens ending at KV length `kv_len`, each
    attending to its own prefix (a fused kernel reads the KV once and skips the masked triangle)."""
    q = query_tokens
    attended = q * kv_len - q * (q - 1) / 2  # sum over query tokens of the positions each attends to
    flops = 4 * spec.heads * spec.head_dim * attended  # QK^T and PV, a multiply-add each
    kv_bytes = 2 * spec.kv_heads * spec.head_dim * spec.dtype_bytes
    io_bytes = kv_len * kv_bytes + q * (2 * spec.heads * spec.head_dim * spec.dtype_bytes + kv_bytes)
    return spec.layers * max(flops / roof.flops(spec.dtype), io_bytes / roof.bandwidth)


def decode_attention_s(spec: ModelSpec, roof: Roofline, decodes: int, kv_len: int) -> float:
    """`decodes` single-token queries, each over its own KV of `kv_len` tokens, in one batched kernel."""
    kv_bytes = 2 * spec.kv_heads * spec.head_dim * spec.dtype_bytes
    flops = decodes * 4 * spec.heads * spec.head_dim * kv_len
    io = decodes * (kv_len + 1) * kv_bytes + decodes * 2 * spec.heads * spec.head_dim * spec.dtype_bytes
    return spec.layers * max(flops / roof.flops(spec.dtype), io / roof.bandwidth)


def all_reduce_s(roof: Roofline, nbytes: float, gpus: int) -> float:
    """A ring all-reduce of `nbytes` over `gpus` GPUs: each sends and receives 2 (n - 1) / n of the buffer
    (NCCL's bus-bandwidth convention), plus the fixed latency."""
    if gpus == 1:
        return 0.0
    if not roof.interconnect_bandwidth:
        raise ValueError(f"roofline {roof.name} has no GPU interconnect, so it cannot price tensor parallelism")
    return roof.interconnect_latency_s + 2 * (gpus - 1) / gpus * nbytes / roof.interconnect_bandwidth


def tensor_parallel_s(spec: ModelSpec, roof: Roofline, gpus: int, tokens: int, sequences: int = 1) -> float:
    """Megatron-style tensor parallelism's communication for one forward of `tokens` query tokens: two
    all-reduces of the hidden states per layer (after the attention output and the MLP's down projection),
    and gathering each sequence's logits from the vocabulary shards (half an all-reduce's traffic). `spec` is
    the whole model. On the critical path: nothing overlaps them."""
    if gpus == 1:
        return 0.0
    hidden = tokens * spec.hidden_size * spec.dtype_bytes
    logits = sequences * spec.vocab_size * spec.dtype_bytes
    gather = roof.interconnect_latency_s + (gpus - 1) / gpus * logits / roof.interconnect_bandwidth
    return spec.layers * 2 * all_reduce_s(roof, hidden, gpus) + gather


def copy_chunk_s(spec: ModelSpec, roof: Roofline, chunk_tokens: int) -> float:
    """One chunk's K and V, all layers, over the host link (`spec`: one GPU's share; the GPUs copy their
    shares over their own links at once)."""
    return chunk_tokens * spec.kv_bytes_per_token / roof.link_bandwidth


def prefill_rows(chunk_tokens: int, largest: int) -> list[int]:
    """Query-token rows of an analytical prefill table: 2, 3, 4, 6, 8, 12, ... chunks up to `largest`. The
    half steps keep linear interpolation between rows within ~3% of the roofline's q^2 term."""
    rows, q = [], 2 * chunk_tokens
    while q <= largest:
        rows.append(q)
        if q * 3 // 2 <= largest:
            rows.append(q * 3 // 2)
        q *= 2
    return rows


def _powers(start: int, stop: int) -> list[int]:
    """start, 2*start, ... up to and including stop (stop itself is added when it is not a power)."""
    values = [int(v) for v in start * 2 ** np.arange(int(np.log2(stop / start)) + 1)]
    return values if values[-1] == stop else values + [stop]


def analytical_profile(
    spec: ModelSpec,
    roof: Roofline,
    chunk_tokens: int = 32,
    max_context: int | None = None,
    max_batch_tokens: int | None = None,
    max_decodes: int = 256,
    tensor_parallel: int = 1,
) -> dict:
    """A profile dict (the YAML format of profiles/README.md) with roofline times for `spec` on `roof`, split
    over `tensor_parallel` GPUs: every table is one GPU's time for its share (`shard`), plus the all-reduces
    (`tensor_parallel_s`) in the non-attention table; the GPUs run in lockstep, so that is the step's time."""
    max_context = max_context or spec.max_context
    max_batch_tokens = max_batch_tokens or max_context
    kv_lens = _powers(chunk_tokens, max_context)
    layers = spec.layers
    gpus = tensor_parallel
    whole, spec = spec, shard(spec, gpus)  # `spec` is one GPU's share from here on
    chunk_s = copy_chunk_s(spec, roof, chunk_tokens)
    r = _round

    def non_attention(tokens: int, sequences: int = 1) -> float:
        return non_attention_s(spec, roof, tokens, sequences) + tensor_parallel_s(whole, roof, gpus, tokens, sequences)

    copy = {
        "chunk_s": r(chunk_s),
        "layer_chunk_s": r(chunk_s / layers),
        "bytes_per_chunk": chunk_tokens * spec.kv_bytes_per_token,
        "bandwidth_gb_s": r(roof.link_bandwidth / 1e9),
    }
    parallel = {} if gpus == 1 else {
        "tensor_parallel": gpus,
        "notes": f"tensor parallelism over {gpus} GPUs (Megatron-style): tables are one GPU's time for its share "
                 f"({spec.heads} of {whole.heads} heads, {spec.kv_heads} of {whole.kv_heads} KV heads, "
                 f"{spec.intermediate_size} of {whole.intermediate_size} MLP width), plus two all-reduces of the "
                 f"hidden states per layer and the logits gather in non_attention_s and per_sequence_s; copies "
                 f"and bytes_per_chunk are one GPU's share over its own host link",
    }
    return {
        "format": 1,
        "source": "analytical",
        "device": roof.name,
        "device_detail": roof.description,
        "model": {"name": whole.name, "dims": {k: v for k, v in whole.to_dict().items() if k != "name"}},
        **parallel,
        "dtype": spec.dtype,
        "chunk_tokens": chunk_tokens,
        "overlap_copies": roof.overlap_copies,
        "versions": {"python": platform.python_version(), "numpy": np.__version__},
        "date": datetime.date.today().isoformat(),
        "method": "roofline: each operation takes max(FLOPs / (peak x compute_efficiency), bytes / "
                  "(bandwidth x memory_efficiency)); attention as an ideal fused kernel (KV read once per "
                  "sequence and step, causal triangle skipped exactly: no tile granularity), tabulated per "
                  "chunk, per whole prefill span (prefill_attention_s) and per decode batch; step overhead = "
                  "kernels_per_layer x layers x launch_s.",
        "analytical": roof.to_dict(),
        "tables": {
            "chunk_attention_s": {L: r(attention_s(spec, roof, chunk_tokens, L)) for L in kv_lens},
            # The same roofline over whole spans, so that a long prefill is charged once for its KV and its
            # triangle rather than as a sum of chunk-sized pieces, each reading the whole KV again.
            "prefill_attention_s": {
                q: {L: r(attention_s(spec, roof, q, L)) for L in sorted({q, *(L for L in kv_lens if L > q)})}
                for q in prefill_rows(chunk_tokens, min(max_batch_tokens, max_context // 2))
            },
            "decode_attention_s": {
                n: {L: r(decode_attention_s(spec, roof, n, L)) for L in kv_lens} for n in _powers(1, max_decodes)
            },
            "non_attention_s": {n: r(non_attention(n)) for n in _powers(1, max_batch_tokens)},
            "per_sequence_s": r(non_attention(1, 2) - non_attention(1, 1)),
            "copy_s": {"device_to_host": copy, "host_to_device": dict(copy)},
            "step_overhead_s": r(KERNELS_PER_LAYER * layers * roof.launch_s),
        },
    }
