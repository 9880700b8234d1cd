"""Which model to profile, and whether it and its KV fit: memory checks before anything is allocated, then the load."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from executor.models import RANDOM_PREFIX, LoadedModel, ModelLoadError, load_model, preset_dims
from pensieve import analytical
from pensieve.models import DEFAULT_MODEL, PRESETS, ModelSpec
from pensieve.profile import Profile


def model_name_of(args: Any, profile: Profile | None = None) -> str | None:
    """The name for load_model: --random-weights turns a preset into random:<preset>; a check of a random
    model's profile defaults to that model."""
    if args.random_weights:
        return RANDOM_PREFIX + (args.model or "smollm2-135m").removeprefix(RANDOM_PREFIX)
    if args.model is None and profile is not None and profile.model.name.startswith(RANDOM_PREFIX):
        return profile.model.name
    return args.model


def _known_spec(name: str | None, dtype: str) -> ModelSpec | None:
    """Dimensions known without loading anything (built-in and random presets); None for other models."""
    if name is None:
        return PRESETS[DEFAULT_MODEL].with_dtype(dtype)
    if name.startswith(RANDOM_PREFIX):
        return ModelSpec(**preset_dims(name, dtype))
    return None


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_memory(spec: ModelSpec, device: torch.device, kv_bytes: int, weights: int | None = None) -> None:
    """Refuse, before allocating, a model and KV store that would not fit the device's free memory."""
    weights = analytical.param_count(spec) * spec.dtype_bytes if weights is None else weights
    slack = 512 * 2**20  # activations, allocator and library working space
    need, free = weights + kv_bytes + slack, available_bytes(device)
    if need > 0.9 * free:
        raise ModelLoadError(
            f"{spec.name} in {spec.dtype} needs about {need / 1e9:.1f} GB on {device} (weights "
            f"{weights / 1e9:.1f} GB + KV store {kv_bytes / 1e9:.1f} GB + working space) but only "
            f"{free / 1e9:.1f} GB is free; use a smaller model, a 16-bit dtype, --quick or a larger device"
        )


def load_for_profiling(name: str | None, device: torch.device, dtype: str, kv_bytes: Callable[[ModelSpec], int]) -> LoadedModel:
    """Load a model after checking that it and its KV store (`kv_bytes` of its dims) fit the device."""
    spec = _known_spec(name, dtype)
    if spec is not None:
        _check_memory(spec, device, kv_bytes(spec))
    loaded = load_model(name, str(device), dtype)
    if spec is None:  # only now are its dimensions known; the KV store is not allocated yet
        weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        spec = ModelSpec(**loaded.dims)
        _check_memory(spec, device, kv_bytes(spec), weights)
    return loaded


def chunk_bytes(spec: ModelSpec, chunk: int) -> int:
    return chunk * spec.kv_bytes_per_token
