"""How the profiler names the device and what it records of it: device names, details, library versions, its thread setting."""

from __future__ import annotations

import contextlib
import os
import platform
import re
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from executor.cpu import profiling_threads, torch_threads
from executor.models import RANDOM_PREFIX


@contextlib.contextmanager
def measuring_threads(device: torch.device) -> Iterator[None]:
    """Measure with `profiling_threads()` on the CPU (executor/cpu.py says why)."""
    with torch_threads(profiling_threads() if device.type == "cpu" else None):
        yield


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.removeprefix(RANDOM_PREFIX).lower()).strip("-")


def device_name(device: torch.device) -> str:
    """The profile's `device`: 'cpu', or the CUDA device's name as a slug (a profile is per device kind)."""
    return "cpu" if device.type == "cpu" else slug(torch.cuda.get_device_name(device))


def device_detail(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu} ({os.cpu_count()} logical CPUs), torch intra-op threads {torch.get_num_threads()}"


def versions() -> dict[str, str]:
    import transformers

    try:
        pensieve = version("pensieve-sim")
    except PackageNotFoundError:
        pensieve = "unknown"
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "transformers": transformers.__version__, "numpy": np.__version__, "pensieve": pensieve}
