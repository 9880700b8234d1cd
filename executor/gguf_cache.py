"""A GGUF model converted once, then loaded from safetensors.

transformers reads a GGUF file by parsing it (SmolLM2's vocabulary alone takes ~3 s), dequantizing
every tensor and building a tokenizer from the vocabulary: ~6 s for SmolLM2-135M on this machine,
at the start of every `pensieve run`, `serve`, `chat` and test session. The conversion is pure, so
its result (fp32 weights, config, tokenizer files) is written once to a cache folder and loaded
from there afterwards in well under a second. The folder is named by the GGUF file's name, size
and modification time, so a changed file is converted again; it is written to a temporary folder
and renamed, so an interrupted conversion leaves nothing half-written. A cache that cannot be
written (a read-only home) only costs the conversion each time.

The cache lives in gguf/ under PENSIEVE_CACHE (executor/user_cache.py); PENSIEVE_GGUF_CACHE=0
turns it off.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from executor.user_cache import cache_root

SWITCH_ENV = "PENSIEVE_GGUF_CACHE"
COMPLETE = "converted-from.txt"  # written last: a folder without it is not a cache entry


def entry_for(path: Path) -> Path | None:
    """The cache folder of one GGUF file as it is now (name, size, modification time)."""
    if os.environ.get(SWITCH_ENV, "1").strip() == "0":
        return None
    stat = path.stat()
    return cache_root() / "gguf" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def load_converted(path: Path, dtype: torch.dtype, convert: Callable[[Path], tuple[Any, Any]]) -> tuple[Any, Any]:
    """(model, tokenizer) of a GGUF file: from the cache when it holds it, else `convert(path)` (fp32)
    and written to the cache for next time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = entry_for(path)
    if entry is not None and (entry / COMPLETE).is_file():
        model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(entry, local_files_only=True)
        return model, tokenizer
    model, tokenizer = convert(path)
    if entry is not None:
        _write(entry, model, tokenizer, path)
    return model.to(dtype), tokenizer


def _write(entry: Path, model, tokenizer, source: Path) -> None:
    """Write the converted model to `entry` through a staging folder renamed at the end; any OS error (a
    read-only or full disk, another process that renamed its copy first) leaves the cache as it was."""
    staging = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
        # transformers will not save_pretrained a model it read from GGUF, though its weights are plain
        # fp32 tensors by now: the weights and the config are written as such.
        from safetensors.torch import save_model

        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE).write_text(f"{source}\n")
        staging.rename(entry)
    except OSError:
        pass
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
