"""Two small C kernels for CPU serving in fp32, built on first use: paged decode attention and small-batch linears.

Decode attention: one query token per sequence attends to all of its history. In torch that
means gathering every chunk of every sequence into a fresh K and V (a copy as large as the batch's
whole KV cache, per layer) before SDPA reads it again; with SmolLM2 on a 2-core CPU the gather and
SDPA took as long as all the decode step's matmuls. `paged_decode` reads each chunk where it lies
in the pool, once.

Linear layers of a decode step: MKL re-packs the weight on every call, which dominates when the
batch has a few rows; `PackedLinears` packs each nn.Linear's weight once into 16-column panels and
runs batches of up to MAX_PACKED_ROWS rows through a register-blocked kernel (~1.6x MKL's speed
for 16 rows on an AMD EPYC, close to its fp32 FMA peak). Prefills keep MKL.

The C source (executor/kernels/cpu_kernels.c) is compiled with the system's C compiler (-O3 -march=native, well under a second)
into a cache folder keyed by source, flags and CPU, loaded with ctypes (which drops the GIL), and
parallelised with OpenMP at torch's thread count (linked against the libgomp torch has already
loaded, it shares torch's thread pool). Anything missing (no compiler, a failed build,
PENSIEVE_NATIVE=0) leaves `kernels()` None and the torch paths in use; PENSIEVE_NATIVE_LINEAR=0
turns off the linear kernel alone. Results match torch's to fp32 rounding (summation order differs).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from importlib import resources
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from executor.user_cache import cache_root

# The kernels' C source, shipped as package data (pyproject.toml) and compiled on first use.
SOURCE = (resources.files("executor") / "kernels" / "cpu_kernels.c").read_text(encoding="utf-8")

CFLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-std=gnu11", "-fno-math-errno"]


def _cache_dir() -> Path:
    return cache_root() / "kernels"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags (a shared cache may span machines)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return os.uname().machine + "".join(lines)


def _build(compiler: str) -> Path:
    """The shared library for SOURCE, compiled once per source, flags, compiler and CPU."""
    key = hashlib.sha256("\0".join([SOURCE, *CFLAGS, compiler, sys.platform, _cpu_identity()]).encode())
    target = _cache_dir() / f"cpu_kernels_{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "cpu_kernels.c", Path(tmp) / "cpu_kernels.so"
        src.write_text(SOURCE)
        subprocess.run([compiler, *CFLAGS, str(src), "-o", str(lib), "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(lib, target)  # atomic: concurrent builders leave one complete file
    return target


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built (or PENSIEVE_NATIVE=0)."""
    if os.environ.get("PENSIEVE_NATIVE", "1") == "0" or sys.platform != "linux":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError):
        return None
    lib.paged_decode_f32.restype = ctypes.c_int
    lib.paged_decode_f32.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int]
    lib.linear_packed_f32.restype = None
    lib.linear_packed_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return lib


decode_kernel = kernels  # the decode attention's name for it


def paged_decode(pool: torch.Tensor, chunks: torch.Tensor, kv_lens: torch.Tensor, q: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Decode attention of `q` [n, heads, head_dim] over one layer's `pool` [slots, 2, chunk, kv_heads, head_dim].

    `chunks` [n, max_chunks] and `kv_lens` [n] are int64; all tensors contiguous fp32 on the CPU.
    Returns [n, heads, head_dim]. Requires `kernels()`.
    """
    lib = kernels()
    assert lib is not None
    n, heads, head_dim = q.shape
    _, _, chunk, kv_heads, _ = pool.shape
    assert pool.is_contiguous() and q.is_contiguous() and chunks.is_contiguous() and kv_lens.is_contiguous()
    assert pool.dtype == q.dtype == torch.float32 and chunks.dtype == kv_lens.dtype == torch.int64
    out = torch.empty_like(q)
    status = lib.paged_decode_f32(pool.data_ptr(), chunks.data_ptr(), kv_lens.data_ptr(), q.data_ptr(),
                                  out.data_ptr(), n, chunks.shape[1], chunk, kv_heads, heads // kv_heads, head_dim,
                                  scale, torch.get_num_threads())
    if status != 0:
        raise MemoryError("paged decode attention: out of memory for the score buffers")
    return out


PANEL = 16  # output columns per packed weight panel (two AVX2 registers)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight [out, in] as zero-padded panels [ceil(out / 16), in, 16], fp32, contiguous."""
    out_features, in_features = weight.shape
    panels = -(-out_features // PANEL)
    padded = weight.new_zeros(panels * PANEL, in_features, dtype=torch.float32)
    padded[:out_features] = weight
    return padded.view(panels, PANEL, in_features).transpose(1, 2).contiguous()


def packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the weight as `pack_linear_weight` made it; x fp32 on the CPU."""
    lib = kernels()
    assert lib is not None
    in_features = packed.shape[1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(1) != 1 or x2.stride(0) < in_features:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, out_features, dtype=torch.float32)
    lib.linear_packed_f32(x2.data_ptr(), x2.stride(0), packed.data_ptr(), out.data_ptr(), out_features, rows,
                          out_features, in_features, torch.get_num_threads())
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], out_features)


# Up to this many rows (tokens), the packed kernel beats MKL on the CPUs measured (it re-packs the
# weight on every call); prefills with more rows keep MKL's GEMM, which is faster there.
MAX_PACKED_ROWS = 128


class PackedLinears:
    """Small-batch fast paths for a model's nn.Linear layers, swapped in only inside `active()`.

    The packed copies cost as much memory as the layers' weights. A layer whose weight was replaced
    or modified in place since packing falls back to F.linear (and is re-packed on the next `active()`).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.modules = [m for m in model.modules() if type(m) is torch.nn.Linear]
        self._entries: dict[torch.nn.Linear, tuple[Any, torch.Tensor, int]] = {}  # forward, weight, version

    @staticmethod
    def usable(model: torch.nn.Module) -> bool:
        """fp32 CPU linear layers, a built kernel, and the packed copies fitting in half the free memory."""
        linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
        if not linears or kernels() is None:
            return False
        if any(m.weight.dtype != torch.float32 or m.weight.device.type != "cpu" for m in linears):
            return False
        needed = sum(m.weight.numel() * 4 for m in linears)
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return False
        return needed < free // 2

    def prepare(self) -> PackedLinears:
        """Pack every layer now (rather than on the first `active()`)."""
        for module in self.modules:
            self._forward(module)
        return self

    def _forward(self, module: torch.nn.Linear) -> Any:
        """The module's packed forward, packed again if its weight was replaced or changed in place."""
        weight = module.weight
        entry = self._entries.get(module)
        if entry is None or entry[1] is not weight or entry[2] != weight._version:
            with torch.no_grad():
                packed = pack_linear_weight(weight.detach())
            entry = (_packed_forward(module, packed, weight), weight, weight._version)
            self._entries[module] = entry
        return entry[0]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within: every nn.Linear of the model runs small batches through the packed kernel."""
        swapped = []
        for module in self.modules:
            if "forward" not in module.__dict__:  # (a forward set on the instance by others is left alone)
                module.__dict__["forward"] = self._forward(module)  # bypasses nn.Module.__setattr__: per step
                swapped.append(module)
        try:
            yield
        finally:
            for module in swapped:
                module.__dict__.pop("forward", None)


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packed_linears(model: torch.nn.Module) -> PackedLinears | None:
    """The model's PackedLinears, packed and shared by all its runners; None where they cannot serve."""
    if os.environ.get("PENSIEVE_NATIVE_LINEAR", "1") == "0" or not PackedLinears.usable(model):
        return None
    if model not in _PACKED:
        _PACKED[model] = PackedLinears(model).prepare()
    return _PACKED[model]


def _packed_forward(module: torch.nn.Linear, packed: torch.Tensor, weight: torch.Tensor):
    out_features = module.out_features

    def forward(x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.float32 and x.device.type == "cpu" and module.weight is weight
                and x.numel() <= MAX_PACKED_ROWS * x.shape[-1] and not torch.is_grad_enabled()):
            return packed_linear(x, packed, out_features, module.bias)
        return torch.nn.functional.linear(x, module.weight, module.bias)

    return forward
