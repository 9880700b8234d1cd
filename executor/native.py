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

The C source is compiled with the system's C compiler (-O3 -march=native, well under a second)
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* GCC/Clang vector extensions: AVX2 registers with -march=native on x86, plain code elsewhere. */
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 ld(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }
static inline v8 vmax(v8 a, v8 b) { const v8i m = a > b; return (v8)((m & (v8i)a) | (~m & (v8i)b)); }
static inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* exp(x) for x <= 0 (Cephes' expf polynomial: ~1 ulp); below -87 it returns ~1e-38 rather than 0. */
static inline v8 vexp(v8 x) {
    x = vmax(x, splat(-87.0f));
    const v8 magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    v8 n = (x * splat(1.44269504088896341f) + magic) - magic;
    v8 r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    v8 p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    v8 scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

/* out[t] = scale * <q, k[t * row : t * row + D]> for t < tn; four tokens at a time keep four FMA chains busy. */
static inline __attribute__((always_inline)) void dots(const float *q, const float *k, int64_t row, int64_t tn,
                                                       float *out, float scale, const int64_t D) {
    int64_t t = 0;
    for (; t + 4 <= tn; t += 4) {
        const float *k0 = k + t * row, *k1 = k0 + row, *k2 = k1 + row, *k3 = k2 + row;
        v8 s0 = splat(0.0f), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t d = 0; d < D; d += 8) {
            const v8 qv = ld(q + d);
            s0 += qv * ld(k0 + d);
            s1 += qv * ld(k1 + d);
            s2 += qv * ld(k2 + d);
            s3 += qv * ld(k3 + d);
        }
        out[t] = hsum(s0) * scale;
        out[t + 1] = hsum(s1) * scale;
        out[t + 2] = hsum(s2) * scale;
        out[t + 3] = hsum(s3) * scale;
    }
    for (; t < tn; t++) {
        v8 s = splat(0.0f);
        for (int64_t d = 0; d < D; d += 8) s += ld(q + d) * ld(k + t * row + d);
        out[t] = hsum(s) * scale;
    }
}

/* acc[0:D] += sum_t p[t] * v[t * row : t * row + D], with acc held in registers for a constant D. */
static inline __attribute__((always_inline)) void axpys(float *acc, const float *p, const float *v, int64_t row,
                                                        int64_t tn, const int64_t D) {
    v8 a[32];
    for (int64_t d = 0; d < D; d += 8) a[d / 8] = ld(acc + d);
    for (int64_t t = 0; t < tn; t++) {
        const v8 pt = splat(p[t]);
        const float *vt = v + t * row;
        for (int64_t d = 0; d < D; d += 8) a[d / 8] += pt * ld(vt + d);
    }
    for (int64_t d = 0; d < D; d += 8) st(acc + d, a[d / 8]);
}

static inline __attribute__((always_inline)) void decode_one(
        const float *pool, const int64_t *chunks, int64_t L, const float *q, float *out, float *scores,
        int64_t chunk, int64_t H, int64_t G, float scale, const int64_t D) {
    const int64_t row = H * D, slot_stride = 2 * chunk * row, QH = H * G;
    for (int64_t c = 0; c * chunk < L; c++) { /* scores[(h * G + g) * L + t] */
        const float *kc = pool + chunks[c] * slot_stride;
        const int64_t tn = (L - c * chunk) < chunk ? (L - c * chunk) : chunk;
        for (int64_t h = 0; h < H; h++)
            for (int64_t g = 0; g < G; g++)
                dots(q + (h * G + g) * D, kc + h * D, row, tn, scores + (h * G + g) * L + c * chunk, scale, D);
    }
    float sums[QH];
    for (int64_t r = 0; r < QH; r++) { /* softmax numerators; the sums divide at the end */
        float *sr = scores + r * L;
        int64_t t = 0;
        v8 mv = splat(sr[0]);
        for (; t + 8 <= L; t += 8) { const v8 x = ld(sr + t); mv = vmax(x, mv); }
        float m = mv[0];
        for (int j = 1; j < 8; j++) m = mv[j] > m ? mv[j] : m;
        for (; t < L; t++) m = sr[t] > m ? sr[t] : m;
        v8 sv = splat(0.0f);
        for (t = 0; t + 8 <= L; t += 8) { const v8 e = vexp(ld(sr + t) - splat(m)); st(sr + t, e); sv += e; }
        float sum = hsum(sv);
        if (t < L) { /* the tail, through a padded vector */
            float tail[8] = {0};
            memcpy(tail, sr + t, sizeof(float) * (size_t)(L - t));
            const v8 e = vexp(ld(tail) - splat(m));
            for (int64_t j = 0; j < L - t; j++) { sr[t + j] = e[j]; sum += e[j]; }
        }
        sums[r] = sum;
    }
    memset(out, 0, sizeof(float) * (size_t)(QH * D));
    for (int64_t c = 0; c * chunk < L; c++) {
        const float *vc = pool + chunks[c] * slot_stride + chunk * row;
        const int64_t tn = (L - c * chunk) < chunk ? (L - c * chunk) : chunk;
        for (int64_t h = 0; h < H; h++)
            for (int64_t g = 0; g < G; g++)
                axpys(out + (h * G + g) * D, scores + (h * G + g) * L + c * chunk, vc + h * D, row, tn, D);
    }
    for (int64_t r = 0; r < QH; r++) {
        const float inv = 1.0f / sums[r];
        for (int64_t d = 0; d < D; d++) out[r * D + d] *= inv;
    }
}

/* One query token per sequence against its paged history, fp32.
   pool:    one layer, [slots, 2, chunk, H, D] contiguous (index 0 of dim 1 is K, 1 is V)
   chunks:  [n, max_chunks] slot of each of a sequence's chunks
   kv_lens: [n] positions 0..kv_len-1 are attended
   q, out:  [n, H * G, D] contiguous (query head h * G + g uses KV head h)
   D must be a multiple of 8 and at most 256. Returns 0, or -1 when out of memory.                */
int paged_decode_f32(const float *pool, const int64_t *chunks, const int64_t *kv_lens, const float *q,
                     float *out, int64_t n, int64_t max_chunks, int64_t chunk, int64_t H, int64_t G,
                     int64_t D, float scale, int threads) {
    const int64_t QH = H * G;
    int failed = 0;
    #pragma omp parallel for schedule(dynamic, 1) reduction(| : failed) num_threads(threads)
    for (int64_t i = 0; i < n; i++) {
        float *scores = (float *)malloc(sizeof(float) * (size_t)(QH * kv_lens[i]));
        if (scores == NULL) { failed = 1; continue; }
        const int64_t *ci = chunks + i * max_chunks;
        const float *qi = q + i * QH * D;
        float *oi = out + i * QH * D;
        if (D == 64) decode_one(pool, ci, kv_lens[i], qi, oi, scores, chunk, H, G, scale, 64);
        else if (D == 128) decode_one(pool, ci, kv_lens[i], qi, oi, scores, chunk, H, G, scale, 128);
        else decode_one(pool, ci, kv_lens[i], qi, oi, scores, chunk, H, G, scale, D);
        free(scores);
    }
    return failed ? -1 : 0;
}
/* ---------------------------------------------------------------- small-batch linear layers
   C[M, N] = X[M, K] . W^T with W packed once as [ceil(N / 16), K, 16] (zero-padded panels).
   MKL packs the weight on every call, which dominates when M is a decode batch; the packed
   panels stream from memory once and each 16-column panel stays in cache across M.        */

/* rows x 16 block of C; with few rows, even and odd k accumulate apart to keep more FMA chains busy. */
static inline __attribute__((always_inline)) void linear_block(const float *x, int64_t ldx, const float *w,
                                                               int64_t K, float *c, int64_t ldc, int64_t nn,
                                                               const int rows) {
    v8 a0[6], a1[6], b0[6], b1[6];
    for (int r = 0; r < rows; r++) a0[r] = a1[r] = b0[r] = b1[r] = splat(0.0f);
    int64_t k = 0;
    if (rows <= 2) {
        for (; k + 2 <= K; k += 2) {
            const v8 w0 = ld(w + k * 16), w1 = ld(w + k * 16 + 8), w2 = ld(w + k * 16 + 16), w3 = ld(w + k * 16 + 24);
            for (int r = 0; r < rows; r++) {
                const v8 xa = splat(x[r * ldx + k]), xb = splat(x[r * ldx + k + 1]);
                a0[r] += xa * w0;
                a1[r] += xa * w1;
                b0[r] += xb * w2;
                b1[r] += xb * w3;
            }
        }
    }
    for (; k < K; k++) {
        const v8 w0 = ld(w + k * 16), w1 = ld(w + k * 16 + 8);
        for (int r = 0; r < rows; r++) {
            const v8 xb = splat(x[r * ldx + k]);
            a0[r] += xb * w0;
            a1[r] += xb * w1;
        }
    }
    for (int r = 0; r < rows; r++) {
        if (rows <= 2) { a0[r] += b0[r]; a1[r] += b1[r]; }
        if (nn == 16) {
            st(c + r * ldc, a0[r]);
            st(c + r * ldc + 8, a1[r]);
        } else {
            float tmp[16];
            st(tmp, a0[r]);
            st(tmp + 8, a1[r]);
            memcpy(c + r * ldc, tmp, sizeof(float) * (size_t)nn);
        }
    }
}

void linear_packed_f32(const float *x, int64_t ldx, const float *wp, float *c, int64_t ldc, int64_t M, int64_t N,
                       int64_t K, int threads) {
    const int64_t panels = (N + 15) / 16;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < panels; p++) {
        const float *w = wp + p * K * 16;
        const int64_t n0 = p * 16, nn = (N - n0) < 16 ? (N - n0) : 16;
        int64_t m0 = 0;
        for (; m0 + 6 <= M; m0 += 6) linear_block(x + m0 * ldx, ldx, w, K, c + m0 * ldc + n0, ldc, nn, 6);
        const float *xr = x + m0 * ldx;
        float *cr = c + m0 * ldc + n0;
        switch (M - m0) {
            case 5: linear_block(xr, ldx, w, K, cr, ldc, nn, 5); break;
            case 4: linear_block(xr, ldx, w, K, cr, ldc, nn, 4); break;
            case 3: linear_block(xr, ldx, w, K, cr, ldc, nn, 3); break;
            case 2: linear_block(xr, ldx, w, K, cr, ldc, nn, 2); break;
            case 1: linear_block(xr, ldx, w, K, cr, ldc, nn, 1); break;
            default: break;
        }
    }
}
"""

CFLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-std=gnu11", "-fno-math-errno"]


def _cache_dir() -> Path:
    base = os.environ.get("PENSIEVE_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pensieve" / "kernels"


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
