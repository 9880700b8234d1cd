"""`pensieve profile --analytical` and the CPU's measured roofline."""

from __future__ import annotations

import datetime
import statistics
from pathlib import Path
from typing import Any

import torch

from executor.models import RANDOM_PREFIX
from executor.profiling.device import device_detail, slug, measuring_threads
from executor.profiling.harness import time_calls
from pensieve import analytical
from pensieve.models import DEFAULT_MODEL, PRESETS, model_spec
from pensieve.profile import dump_profile


def measure_cpu_roofline() -> analytical.Roofline:
    """This CPU as a roofline: best fp32 GEMM rate and copy bandwidth on one thread, and the fixed cost of a
    tiny module call (the CPU's "kernel launch": Python and operator dispatch)."""
    with measuring_threads(torch.device("cpu")):
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)  # [1024, 1024] each: 2 GFLOP per product
        flops = 2 * 1024**3 / min(time_calls(lambda: a @ b, 10))
        src = torch.ones(64 * 2**20)  # 256 MiB, far beyond the last-level cache
        dst = torch.empty_like(src)
        bandwidth = 2 * src.nbytes / min(time_calls(lambda: dst.copy_(src), 5))  # read + write
        layer, x = torch.nn.Linear(8, 8), torch.randn(1, 8)
        with torch.inference_mode():
            launch = statistics.median(time_calls(lambda: layer(x), 2000, warmup=100))
        description = device_detail(torch.device("cpu"))
    return analytical.Roofline(
        name="cpu",
        description=description,
        peak_flops={"float32": flops},
        memory_bandwidth=bandwidth,
        link_bandwidth=bandwidth,  # both tiers are RAM: a swap is a memory copy
        compute_efficiency=1.0,  # the figures are measured, already what a kernel sustains
        memory_efficiency=1.0,
        launch_s=launch,
        overlap_copies=False,
        sources=(f"measured by `pensieve profile --analytical cpu` on {datetime.date.today().isoformat()}: best of "
                 "10 fp32 1024x1024 matmuls (torch, 1 thread); best of 5 copies of 256 MiB (bytes read + written); "
                 "median call of nn.Linear(8, 8) on one row as the per-kernel dispatch cost",),
    )


def write_analytical(args: Any) -> int:
    """`--analytical GPU`: a roofline profile of a model preset on a published GPU (or this CPU, measured)."""
    gpu = args.analytical.lower()
    gpus = getattr(args, "tensor_parallel", 1)
    if gpus != 1 and gpu not in analytical.GPUS:
        raise ValueError(f"--tensor-parallel {gpus}: only the published GPUs have an interconnect to split a model "
                         f"over ({', '.join(analytical.GPUS)})")
    name = (args.model or DEFAULT_MODEL).removeprefix(RANDOM_PREFIX).lower()
    if name not in PRESETS:
        raise ValueError(f"--analytical needs a model preset for its dimensions; known: {', '.join(PRESETS)}")
    if gpu == "cpu":
        spec = model_spec(name, args.dtype or "float32")
        roof = measure_cpu_roofline()
        data = analytical.analytical_profile(spec, roof, args.chunk_tokens, max_context=min(spec.max_context, 4096),
                                             max_batch_tokens=1024, max_decodes=16)
    elif gpu in analytical.GPUS:
        spec = model_spec(name, args.dtype or "float16")
        data = analytical.analytical_profile(spec, analytical.GPUS[gpu], args.chunk_tokens, tensor_parallel=gpus)
    else:
        raise ValueError(f"--analytical {args.analytical!r}: known devices are "
                         f"{', '.join([*analytical.GPUS, 'cpu'])}")
    suffix = "-analytical" if gpu == "cpu" else ""  # beside a measured profile of the same device
    gpus_prefix = f"{gpus}x" if gpus > 1 else ""
    out = Path(args.out or f"profiles/{gpus_prefix}{gpu}-{slug(spec.name)}-{spec.dtype}{suffix}.yaml")
    dump_profile(data, out)
    print(f"wrote {out}")
    return 0
