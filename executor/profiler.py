"""`pensieve profile`: measure a device's cost tables on the real runner, check a profile, or write a roofline.

This is the verb's entry point; the work is in executor/profiling/, one job per module: which model
and whether it fits (memory), the grid of step shapes (grid), the timing harness (harness), the
profile assembled from its timings (assemble), `--check` (check), the machine-speed probe validation
uses (speed), `--analytical` and the CPU roofline (roofline), device naming and threads (device).

Attention is timed from inside real forwards: the registered paged-attention function is wrapped and each
of its calls clocked, so what is measured is the executor's own kernel on its own data; the rest of the
same forward is the non-attention time. The method and the file format are in profiles/README.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from executor.models import default_device, resolve_device
from executor.profiling.assemble import measure_profile
from executor.profiling.check import print_check, run_check
from executor.profiling.device import slug, measuring_threads
from executor.profiling.roofline import write_analytical
from pensieve.profile import dump_profile, load_profile


def main(args: Any) -> int:
    """Entry point of `pensieve profile` (arguments as parsed by pensieve.cli)."""
    if args.analytical:
        return write_analytical(args)
    if getattr(args, "tensor_parallel", 1) != 1:
        raise ValueError("--tensor-parallel is for --analytical profiles: the profiler measures one device")
    device = resolve_device(args.device or default_device())
    with measuring_threads(device):
        if args.check:
            profile = load_profile(args.check)
            print_check(run_check(profile, args, device), profile)
            return 0
        data = measure_profile(args, device)
    out = Path(args.out or f"profiles/{data['device']}-{slug(data['model']['name'])}-{data['dtype']}.yaml")
    dump_profile(data, out)
    print(f"wrote {out} ({data['profile_seconds']:.0f} s)")
    return 0
