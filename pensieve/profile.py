"""Profiles: a device's timing tables as YAML (validated on load), and the cost model built on them.

The file format and the cost model's rules (interpolation, extrapolation, overlap) are described in
profiles/README.md; this module is their implementation and must stay torch-free.
"""
from __future__ import annotations

import bisect

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy.optimize import isotonic_regression, nnls

from .cost import CostModel
from .models import DTYPE_BYTES, ModelSpec
from .results import write_text
from .textfiles import NotUtf8, read_utf8

FORMAT = 1
SOURCES = ("measured", "analytical")
DIRECTIONS = ("device_to_host", "host_to_device")
# The dimensions that decide timings; the name and max_context do not.
TIMING_DIMS = ("architecture", "layers", "hidden_size", "heads", "kv_heads", "head_dim", "intermediate_size",
               "vocab_size", "dtype")


class ProfileError(ValueError):
    """A profile file that is missing, malformed or for another model."""


# ----------------------------------------------------------------------------------------------------------
# Loading and validation


# Every key a profile may hold, so that a misspelt one ("prefil_attention_s", or "unit: ms" read as
# seconds) is an error rather than silently ignored.
TOP_KEYS = ("format", "source", "analytical", "method", "device", "device_type", "device_detail", "model",
            "tensor_parallel", "dtype",
            "chunk_tokens",
            "overlap_copies", "versions", "date", "tables", "profile_seconds", "repeats", "runtime", "notes")
TABLE_KEYS = ("chunk_attention_s", "decode_attention_s", "non_attention_s", "per_sequence_s", "step_overhead_s",
              "copy_s", "prefill_attention_s", "fresh_prefill_attention_s")
COPY_KEYS = ("chunk_s", "layer_chunk_s", "bandwidth_gb_s", "bytes_per_chunk")


DEVICE_TYPES = ("cpu", "cuda")


def device_type(profile: "Profile") -> str:
    """The kind of device a profile was measured on, as torch names it: its `device_type` key, or (for
    profiles written before the key) "cpu" for a device named cpu and "cuda" for any other (measured
    GPU profiles are named after the GPU, e.g. nvidia-h100-80gb-hbm3)."""
    explicit = profile.data.get("device_type")
    if explicit is not None:
        return explicit
    return "cpu" if profile.device.lower().startswith("cpu") else "cuda"


def _fail(source: str, key: str, message: str) -> ProfileError:
    return ProfileError(f"profile {source}: {key}: {message}")


def _known_keys(source: str, data: dict, allowed: tuple[str, ...], where: str) -> None:
    import difflib

    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise _fail(source, f"{where}.{key}" if where else str(key),
                        f"unknown key; {hint}allowed here: {', '.join(allowed)} (times are always in seconds)")


def _get(source: str, data: dict, key: str, where: str, kinds: type | tuple[type, ...], expected: str) -> Any:
    path = f"{where}.{key}" if where else key
    if key not in data:
        raise _fail(source, path, f"missing; expected {expected}")
    value = data[key]
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):  # bool is an int
        raise _fail(source, path, f"expected {expected}, got {type(value).__name__} {value!r}"[:300])
    return value


def _point(source: str, value: Any, path: str) -> float:
    """A table entry: seconds as a number, or {median: s, ...spread}; returns the median."""
    if isinstance(value, dict):
        value = _get(source, value, "median", path, (int, float), "a number of seconds")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise _fail(source, path, f"expected seconds >= 0 (a number or {{median: s, p10: s, p90: s}}), got {value!r}")
    return float(value)


def _table(source: str, value: Any, path: str, min_points: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A 1-D table {positive int key: point}; returns sorted keys and medians."""
    if not isinstance(value, dict) or len(value) < min_points:
        raise _fail(source, path, f"expected a mapping of at least {min_points} integer keys to seconds, got {value!r}"[:300])
    keys = []
    for key in value:
        if isinstance(key, bool) or not isinstance(key, int) or key < 1:
            raise _fail(source, f"{path}.{key}", "keys must be positive integers (token or batch counts)")
        keys.append(key)
    keys.sort()
    return np.array(keys, float), np.array([_point(source, value[k], f"{path}.{k}") for k in keys])


def _table2d(source: str, value: Any, path: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """A 2-D table {row int: {column int: point}}."""
    if not isinstance(value, dict) or not value:
        raise _fail(source, path, f"expected a mapping of integer rows to tables, got {value!r}"[:300])
    rows = {}
    for row in sorted(value, key=lambda k: (not isinstance(k, int), k if isinstance(k, int) else 0)):
        if isinstance(row, bool) or not isinstance(row, int) or row < 1:
            raise _fail(source, f"{path}.{row}", "row keys must be positive integers")
        rows[row] = _table(source, value[row], f"{path}.{row}")
    return rows


@dataclass(frozen=True)
class Profile:
    """A validated profile: its raw contents (`data`, as in the file) and the fields the simulator reads."""

    path: str
    data: dict
    source: str
    device: str
    model: ModelSpec
    chunk_tokens: int
    overlap_copies: bool
    tensor_parallel: int = 1  # GPUs the model is split over; the tables are one GPU's share

    @property
    def dtype(self) -> str:
        return self.model.dtype

    @property
    def tables(self) -> dict:
        return self.data["tables"]


def profile_from_dict(data: Any, source: str = "<dict>") -> Profile:
    """Validate a profile's contents (as loaded from YAML); errors name `source`, the key and what is expected."""
    if not isinstance(data, dict):
        raise _fail(source, "(top level)", f"expected a mapping, got {type(data).__name__}")
    _known_keys(source, data, TOP_KEYS, "")
    fmt = _get(source, data, "format", "", int, f"the format version {FORMAT}")
    if fmt != FORMAT:
        raise _fail(source, "format", f"version {fmt} is not supported (this code reads {FORMAT})")
    kind = _get(source, data, "source", "", str, f"one of {list(SOURCES)}")
    if kind not in SOURCES:
        raise _fail(source, "source", f"expected one of {list(SOURCES)}, got {kind!r}")
    if kind == "analytical":
        _get(source, data, "analytical", "", dict, "the roofline figures and their sources")
    device = _get(source, data, "device", "", str, "a device name, e.g. cpu or a100-80gb")
    if data.get("device_type", "cpu") not in DEVICE_TYPES:
        raise _fail(source, "device_type", f"{data['device_type']!r}; allowed: {', '.join(DEVICE_TYPES)}")
    model = _get(source, data, "model", "", dict, "{name: ..., dims: {...}}")
    name = _get(source, model, "name", "model", str, "the model's name")
    dims = _get(source, model, "dims", "model", dict, "the model's dimensions (ModelSpec fields)")
    try:
        spec = ModelSpec(name=name, **dims)
    except (TypeError, ValueError) as err:
        raise _fail(source, "model.dims", f"not a valid model description ({err})") from err
    dtype = _get(source, data, "dtype", "", str, f"one of {sorted(DTYPE_BYTES)}")
    if dtype != spec.dtype:
        raise _fail(source, "dtype", f"{dtype!r} differs from model.dims.dtype {spec.dtype!r}")
    chunk = _get(source, data, "chunk_tokens", "", int, "a positive number of tokens")
    if chunk < 1:
        raise _fail(source, "chunk_tokens", f"expected a positive number of tokens, got {chunk}")
    overlap = _get(source, data, "overlap_copies", "", bool, "true or false")
    versions = _get(source, data, "versions", "", dict, "a mapping of library names to versions")
    if "python" not in versions:
        raise _fail(source, "versions.python", "missing; expected the Python version")
    _get(source, data, "date", "", str, "an ISO date, quoted")
    tables = _get(source, data, "tables", "", dict, "the timing tables")
    _check_tables(source, tables, chunk)
    gpus = data.get("tensor_parallel", 1)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise _fail(source, "tensor_parallel", f"expected a whole number of GPUs >= 1, got {gpus!r}")
    return Profile(source, data, kind, device, spec, chunk, overlap, gpus)


def _check_tables(source: str, tables: dict, chunk: int) -> None:
    def need(key: str) -> Any:
        if key not in tables:
            raise _fail(source, f"tables.{key}", "missing; see profiles/README.md for the tables a profile holds")
        return tables[key]

    _known_keys(source, tables, TABLE_KEYS, "tables")
    for key in ("chunk_attention_s", "non_attention_s"):
        _, seconds = _table(source, need(key), f"tables.{key}")
        if not seconds.any():
            raise _fail(source, f"tables.{key}", "every entry is 0 s: no model computes in no time; re-measure it")
    decode = _table2d(source, need("decode_attention_s"), "tables.decode_attention_s")
    if 1 not in decode:
        raise _fail(source, "tables.decode_attention_s.1", "missing; the single-decode row is required")
    if not any(seconds.any() for _, seconds in decode.values()):
        raise _fail(source, "tables.decode_attention_s", "every entry is 0 s: no model computes in no time")
    _point(source, need("per_sequence_s"), "tables.per_sequence_s")
    _point(source, need("step_overhead_s"), "tables.step_overhead_s")
    copy = need("copy_s")
    if isinstance(copy, dict):
        _known_keys(source, copy, DIRECTIONS, "tables.copy_s")
    for direction in DIRECTIONS:
        entry = _get(source, copy, direction, "tables.copy_s", dict, "{chunk_s, layer_chunk_s, ...}")
        _known_keys(source, entry, COPY_KEYS, f"tables.copy_s.{direction}")
        for key in ("chunk_s", "layer_chunk_s"):
            _point(source, _get(source, entry, key, f"tables.copy_s.{direction}", (int, float, dict), "seconds"),
                   f"tables.copy_s.{direction}.{key}")
    if "prefill_attention_s" in tables:
        for q, (kv_lens, _) in _table2d(source, tables["prefill_attention_s"], "tables.prefill_attention_s").items():
            if q <= chunk or kv_lens[0] < q:
                raise _fail(source, f"tables.prefill_attention_s.{q}",
                            f"rows must have more than chunk_tokens ({chunk}) query tokens and KV lengths >= them")
    if "fresh_prefill_attention_s" in tables:
        if "prefill_attention_s" not in tables:
            raise _fail(source, "tables.fresh_prefill_attention_s", "needs the prefill_attention_s table it extends")
        queries, _ = _table(source, tables["fresh_prefill_attention_s"], "tables.fresh_prefill_attention_s", 1)
        if queries[0] <= max(tables["prefill_attention_s"]):
            raise _fail(source, "tables.fresh_prefill_attention_s",
                        "holds fresh prefills past the prefill_attention_s rows only (query tokens > the last row)")


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile YAML file."""
    path = Path(path)
    try:
        text = read_utf8(path)
    except OSError as err:
        raise ProfileError(f"profile {path}: cannot read it ({err.strerror or err})") from err
    except NotUtf8 as err:
        raise ProfileError(f"profile {path}: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ProfileError(f"profile {path}: not valid YAML ({err})") from err
    return profile_from_dict(data, str(path))


class _Dumper(yaml.SafeDumper):
    """Tables in block style, one grid point per line; a point's stats and other flat records inline."""


def _represent_dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    flat = all(isinstance(k, str) and not isinstance(v, (dict, list)) for k, v in data.items())
    return dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=flat)


_Dumper.add_representer(dict, _represent_dict)


def dump_profile(data: dict, path: str | Path) -> Profile:
    """Validate a profile dict and write it as YAML; returns the validated profile."""
    profile = profile_from_dict(data, str(path))
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=10_000)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "# Pensieve cost profile; the format is described in profiles/README.md\n" + text)
    return profile


def check_profile_matches(profile: Profile, model: ModelSpec, source_name: str, tensor_parallel: int = 1) -> None:
    """Raise ProfileError unless `profile` was made for a model with `model`'s dimensions and dtype, split over
    `tensor_parallel` GPUs."""
    if profile.tensor_parallel != tensor_parallel:
        raise ProfileError(
            f"{source_name}: profile {profile.path} times {profile.model.name} split over {profile.tensor_parallel} "
            f"GPU(s) (its tensor_parallel) but the scenario sets tensor_parallel: {tensor_parallel}; write a "
            f"matching one with `pensieve profile --analytical <gpu> --model {model.name} --tensor-parallel "
            f"{tensor_parallel}`")
    diffs = [f"{key} {getattr(profile.model, key)!r} vs {getattr(model, key)!r}"
             for key in TIMING_DIMS if getattr(profile.model, key) != getattr(model, key)]
    if diffs:
        raise ProfileError(
            f"{source_name}: profile {profile.path} is for {profile.model.name} ({profile.dtype}) but the model is "
            f"{model.name} ({model.dtype}); they differ in {', '.join(diffs)}. Measure a matching profile with "
            f"`pensieve profile --model <model> --dtype {model.dtype}`, or write a roofline one with "
            f"`pensieve profile --analytical <gpu> --model <preset> --dtype {model.dtype}`."
        )


# ----------------------------------------------------------------------------------------------------------
# Interpolation


class Curve:
    """y(x) through a table's medians: linear between points, flat below the first, linear past the last two.

    The medians are first made non-decreasing (scipy's isotonic regression): work that grows cannot take
    less time, and noise can make neighbouring medians cross, which would reorder evictions.
    """

    def __init__(self, xs: np.ndarray, ys: np.ndarray, name: str = "") -> None:
        self.xs = np.asarray(xs, float)
        raw = np.asarray(ys, float)
        self.ys = isotonic_regression(raw).x
        moved = np.flatnonzero(~np.isclose(self.ys, raw, rtol=1e-12, atol=0.0))
        # What the repair changed, for the command to report (None: the medians were already in order).
        shift = np.abs(self.ys[moved] - raw[moved])
        largest = f"{float(shift.max()):.3g} s" if len(moved) and np.any(raw[moved] == 0) else \
            f"{float(np.max(shift / raw[moved])):.1%}" if len(moved) else ""
        self.repair = None if not len(moved) else (
            f"{name or 'a table'}: {len(moved)} of {len(raw)} medians made nondecreasing, the largest moved by "
            f"{largest}")
        self.last_slope = float((self.ys[-1] - self.ys[-2]) / (self.xs[-1] - self.xs[-2]))
        self._xs, self._ys = self.xs.tolist(), self.ys.tolist()

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        if isinstance(x, (int, float)):  # the simulator's per-step case: plain floats beat numpy's overhead
            xs, ys = self._xs, self._ys
            if x <= xs[0]:
                return ys[0]
            if x >= xs[-1]:
                return ys[-1] + self.last_slope * (x - xs[-1])
            i = bisect.bisect_right(xs, x)
            return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        y = np.interp(x, self.xs, self.ys) + self.last_slope * np.maximum(np.subtract(x, self.xs[-1]), 0.0)
        return float(y) if np.ndim(y) == 0 else y


class Surface:
    """t(r, x) from rows of curves in x (r: query tokens or decodes), linear in r between rows.

    Past the last row, linear from the last two rows. With a `diagonal` (the fresh-prefill curve t(x, x)),
    row r holds only for x >= r: between rows r0 < r < r1 at x < r1, t runs from row r0 to the diagonal at r = x;
    a fresh prefill past the last row (r >= x) reads the diagonal, which may hold points past the rows.
    """

    def __init__(self, rows: dict[int, Curve], diagonal: Curve | None = None) -> None:
        self.keys = sorted(rows)
        self.rows = rows
        self.diagonal = diagonal

    def __call__(self, r: float, x: float) -> float:
        keys = self.keys
        if r <= keys[0] or len(keys) == 1:
            base = self.rows[keys[0]](x)
            return base if r <= keys[0] else base * r / keys[0]
        if r >= keys[-1]:
            if self.diagonal is not None and r >= x and x > keys[-1]:
                return self.diagonal(x)
            r0, r1 = keys[-2], keys[-1]
            v0, v1 = self.rows[r0](x), self.rows[r1](x)
            return v1 + max(v1 - v0, 0.0) * (r - r1) / (r1 - r0)
        i = int(np.searchsorted(keys, r, side="right"))
        r0, r1 = keys[i - 1], keys[i]
        v0 = self.rows[r0](x)
        if self.diagonal is not None and x < r1:
            r1, v1 = x, self.diagonal(x)
        else:
            v1 = self.rows[r1](x)
        return v0 if r1 == r0 else v0 + (v1 - v0) * (r - r0) / (r1 - r0)


def _curve(source: str, table: dict, path: str) -> Curve:
    return Curve(*_table(source, table, path), name=path)


class PrefillFit:
    """One sequence's prefill attention as t(q, L) = a + b·q + c·L + d·pairs(q, L).

    q query tokens end at KV length L. The executor computes the masked q x L rectangle of scores over a
    gathered KV, so pairs = q·L, with per-call (a), per-query (b) and per-KV-token (c: the gather) costs. A
    fresh prefill (q = L) runs a causal kernel that skips whole tiles of B keys above the diagonal:
    pairs = q²/2 + q·min(q, B)/2 (the full square up to one tile, about half of it far past). B is fitted
    with the rest, searched over multiples of the chunk; torch's CPU flash kernel splits keys in 512s.
    Fitted by non-negative least squares on relative error to every measured (q, L) point, the chunk table's
    included, it smooths each point's noise and extends past the last row by the kernel's own shape, where
    interpolating between rows must extrapolate (the long whole-history prefills of `stateless`). Every term
    is nondecreasing in q and in L.
    """

    def __init__(self, points: np.ndarray, chunk_tokens: int) -> None:
        q, kv, t = np.asarray(points, float).T
        best = None
        for tile in range(chunk_tokens, int(kv.max()) + chunk_tokens, chunk_tokens):
            coef, residual = nnls(self._design(q, kv, tile) / t[:, None], np.ones_like(t))
            if best is None or residual < best[0] - 1e-12:
                best = (residual, tile, coef)
        _, self.causal_tile, self.coef = best
        self.call_s, self.query_s, self.kv_s, self.pair_s = (float(c) for c in self.coef)

    @staticmethod
    def _design(q: np.ndarray, kv: np.ndarray, tile: int) -> np.ndarray:
        fresh = q >= kv
        pairs = np.where(fresh, q * q / 2 + q * np.minimum(q, tile) / 2, q * kv)
        return np.stack([np.ones_like(q), q, kv, pairs], axis=1)

    def __call__(self, q: float, kv: float) -> float:
        pairs = q * q / 2 + q * min(q, self.causal_tile) / 2 if q >= kv else q * kv
        return self.call_s + self.query_s * q + self.kv_s * kv + self.pair_s * pairs


def prefill_points(profile: Profile) -> np.ndarray:
    """Every measured prefill attention point (q, L, seconds): the chunk table as row q = chunk_tokens, then
    the `prefill_attention_s` table and the fresh prefills past its rows (empty without a prefill table)."""
    t, chunk = profile.tables, profile.chunk_tokens
    if "prefill_attention_s" not in t:
        return np.empty((0, 3))
    points = [(chunk, kv, y) for kv, y in zip(*_table(profile.path, t["chunk_attention_s"], "chunk_attention_s"))
              if kv >= chunk]
    for q, (kvs, ys) in _table2d(profile.path, t["prefill_attention_s"], "prefill_attention_s").items():
        points += [(q, kv, y) for kv, y in zip(kvs, ys)]
    if "fresh_prefill_attention_s" in t:
        points += [(q, q, y) for q, y in zip(*_table(profile.path, t["fresh_prefill_attention_s"],
                                                      "fresh_prefill_attention_s", 1))]
    return np.array(points, float)


def interpolated_surface(points: np.ndarray, decode_row: Curve, chunk_curve: Curve | None = None) -> Surface:
    """The prefill table as rows interpolated in L and linearly between rows in q (rules in profiles/README.md):
    row 1 is the decode row, row `chunk_tokens` the chunk table (`chunk_curve`, else the points' own), the
    diagonal each row's value at L = q (fresh prefills), then the single fresh points past the rows. A row
    needs two points."""
    by_row: dict[int, list[tuple[float, float]]] = {}
    for q, kv, y in points:
        by_row.setdefault(int(q), []).append((kv, y))
    rows = {q: Curve(*np.array(sorted(row)).T, name=f"prefill_attention_s.{q}")
            for q, row in by_row.items() if len(row) >= 2}
    if chunk_curve is not None:
        rows[int(points[0][0])] = chunk_curve
    past = [(q, row[0][1]) for q, row in by_row.items() if len(row) == 1 and q > max(rows) and row[0][0] == q]
    diagonal = Curve(*np.array([(q, rows[q](q)) for q in sorted(rows)] + sorted(past)).T, name="fresh prefills")
    rows[1] = decode_row
    return Surface(rows, diagonal)


PREFILL_SURFACES = ("fitted", "interpolated")


def held_out_errors(points: np.ndarray, decode_row: Curve, chunk_tokens: int) -> dict[str, np.ndarray]:
    """Leave-one-out relative errors of both prefill surfaces: each measured point predicted from all the others.

    A point at the table's edge is then predicted by extrapolation, as the simulator does for spans past the
    grid; this is how `profile --check` tells which surface to trust off the grid without running anything."""
    errors: dict[str, list[float]] = {name: [] for name in PREFILL_SURFACES}
    for i, (q, kv, y) in enumerate(points):
        rest = np.delete(points, i, axis=0)
        errors["fitted"].append(PrefillFit(rest, chunk_tokens)(q, kv) / y - 1)
        errors["interpolated"].append(interpolated_surface(rest, decode_row)(q, kv) / y - 1)
    return {name: np.array(e) for name, e in errors.items()}


# ----------------------------------------------------------------------------------------------------------
# The cost model


class ProfileCostModel(CostModel):
    """Cost(l) and step times from a profile (rules in profiles/README.md, "The cost model").

    A step costs: overhead + non-attention(query tokens, sequences) + attention of each prefill + attention
    of the decode batch, with swap copies overlapped layer by layer where the device has a copy engine.
    """

    def __init__(self, profile: Profile, prefill_surface: str | None = None) -> None:
        # A measured table is this executor's kernel, whose shape the fit knows; an analytical table is an
        # exact roofline of another kernel (the ideal fused one), read as it is.
        prefill_surface = prefill_surface or ("fitted" if profile.source == "measured" else "interpolated")
        if prefill_surface not in PREFILL_SURFACES:
            raise ValueError(f"prefill_surface {prefill_surface!r}: expected one of {', '.join(PREFILL_SURFACES)}")
        self.profile = profile
        src, t = profile.path, profile.tables
        self.chunk_attention = _curve(src, t["chunk_attention_s"], "chunk_attention_s")
        decode_rows = {n: Curve(*row, name=f"decode_attention_s.{n}")
                       for n, row in _table2d(src, t["decode_attention_s"], "decode").items()}
        self.decode_row = decode_rows[1]
        self.decode_call_s, self.decode_context_s, self.decode_token_s = _fit_decodes(decode_rows)
        # A measured prefill table gives the executor's own cost at (q, L); which surface reads it is the
        # caller's choice (`profile --check` reports both), the fit by default (see PrefillFit).
        self.prefill_attention: PrefillFit | Surface | None = None
        self.prefill_surface = None
        curves = []
        points = prefill_points(profile)
        if len(points):
            self.prefill_surface = prefill_surface
            if prefill_surface == "fitted":
                self.prefill_attention = PrefillFit(points, profile.chunk_tokens)
            else:
                surface = interpolated_surface(points, self.decode_row, self.chunk_attention)
                curves = [c for q, c in surface.rows.items() if q not in (1, profile.chunk_tokens)]
                self.prefill_attention = surface
        self.non_attention = _curve(src, t["non_attention_s"], "non_attention_s")
        curves += [self.chunk_attention, self.non_attention, *decode_rows.values()]
        self.repairs = [c.repair for c in curves if c.repair]  # reported by the commands that load it
        self._non_attention_memo: dict[int, float] = {}
        self.per_sequence_s = max(_point(src, t["per_sequence_s"], "per_sequence_s"), 0.0)
        self.overhead_s = _point(src, t["step_overhead_s"], "step_overhead_s")
        self.copy_chunk_s = {d: _point(src, t["copy_s"][d]["chunk_s"], d) for d in DIRECTIONS}

    @property
    def token_s(self) -> float:
        """Marginal non-attention seconds per token at the largest profiled batch, where recompute rides."""
        return self.non_attention.last_slope

    def chunk_recompute_s(self, context_tokens: int, chunk_tokens: int) -> float:
        """Cost(l) = Cost_attention(l) + c (§4.3.1): the chunk's attention after l tokens plus its non-attention share."""
        return self.attention_s(chunk_tokens, context_tokens + chunk_tokens) + chunk_tokens * self.token_s

    def attention_s(self, query_tokens: int, kv_len: int) -> float:
        """One sequence's attention, all layers, for `query_tokens` trailing tokens of a KV of `kv_len`."""
        return self.prefill_s([(kv_len - query_tokens, query_tokens)], kv_len)

    def prefill_s(self, spans: list[tuple[int, int]], context_tokens: int) -> float:
        """Attention of one prefilling sequence whose query `spans` [(start, length)] end at `context_tokens`.

        A measured 2-D table gives the executor's own cost for (query tokens, KV length), fitted or
        interpolated (`prefill_surface`). Without one, each
        token attends to its own prefix (an ideal kernel): the chunk table is summed over chunk-sized pieces,
        each at the KV length that makes its mean attended length equal the piece's.
        """
        queries = sum(length for _, length in spans)
        if queries == 0:
            return 0.0
        if self.prefill_attention is not None:
            return self.prefill_attention(queries, context_tokens)
        chunk = self.profile.chunk_tokens
        if queries <= 64 * chunk:  # the common case, in plain floats: numpy's per-call overhead would dominate
            curve, total = self.chunk_attention, 0.0
            for s, n in spans:
                for a in range(s, s + n, chunk):
                    b = min(a + chunk, s + n)
                    total += (b - a) / chunk * curve((a + b) / 2 + chunk / 2)
            return total
        pieces = np.array([(a, min(a + chunk, s + n)) for s, n in spans for a in range(s, s + n, chunk)], float)
        starts, ends = pieces.T  # [pieces] each
        return float(np.sum((ends - starts) / chunk * self.chunk_attention((starts + ends) / 2 + chunk / 2)))

    def decodes_s(self, decodes: int, context_tokens: int) -> float:
        """A batch of single-token queries from their count and summed KV lengths (all a plan gives):
        a least-squares line call + a * sum + b * count fitted to the decode table."""
        if decodes == 0:
            return 0.0
        return self.decode_call_s + self.decode_context_s * context_tokens + self.decode_token_s * decodes

    def non_attention_s(self, tokens: int, sequences: int) -> float:
        """Projections, MLP, norms and LM head for `tokens` query tokens in `sequences` sequences."""
        if tokens == 0:
            return 0.0
        return self.non_attention(tokens) + self.per_sequence_s * max(sequences - 1, 0)

    def copy_s(self, chunks: int, direction: str, chunk_tokens: int) -> float:
        """Copy time of `chunks` chunks of `chunk_tokens` tokens, all layers, in one direction."""
        return chunks * self.copy_chunk_s[direction] * chunk_tokens / self.profile.chunk_tokens

    def compute_s(self, plan) -> float:
        """The forward pass of a plan, without copies (0 for a plan with no tokens)."""
        decodes, context = len(plan.decodes), plan.decode_context_tokens
        tokens = decodes
        prefill = 0.0
        for item in plan.prefills:
            queries = item.query_tokens
            tokens += queries
            if queries == 1:  # the executor batches a one-token query with the decodes
                decodes, context = decodes + 1, context + item.context_tokens
            else:
                prefill += self.prefill_s(item.spans, item.context_tokens)
        if tokens == 0:
            return 0.0
        # (decodes_s and non_attention_s inlined: the simulator calls this once per step)
        decode = self.decode_call_s + self.decode_context_s * context + self.decode_token_s * decodes if decodes else 0.0
        sequences = len(plan.decodes) + len(plan.prefills)
        return (self.overhead_s + self._non_attention_of(tokens) + self.per_sequence_s * max(sequences - 1, 0) + prefill
                + decode)

    def step_time_s(self, plan, chunk_tokens: int) -> float:
        """Seconds for a plan's copies and forward.

        With a copy engine (`overlap_copies`), swap-in runs layer by layer beside compute, so the step takes
        the longer of the two plus one layer of the other (the first layer's copy, or the last layer's
        compute, cannot overlap); swap-out uses the host link only where swap-in leaves it idle, adding time
        only when both together outlast the step. Without one (CPU: a copy is a memcpy), everything adds up.
        """
        if not plan.prefills and not plan.swap_in and not plan.swap_out and plan.decodes:
            return self.decode_step_s(len(plan.decodes), plan.decode_context_tokens, chunk_tokens)
        compute = self.compute_s(plan)
        swap_in = self.copy_s(len(plan.swap_in), "host_to_device", chunk_tokens)
        swap_out = self.copy_s(len(plan.swap_out), "device_to_host", chunk_tokens)
        if not self.profile.overlap_copies:
            return compute + swap_in + swap_out
        layers = self.profile.model.layers
        step = max(compute + swap_in / layers, swap_in + compute / layers) if swap_in else compute
        return max(step, swap_in + swap_out)

    def decode_step_s(self, decodes: int, context_tokens: int, chunk_tokens: int) -> float:
        """Decodes alone, most of a simulation's steps: compute_s's sum with its zero terms left out
        (adding 0.0 changes no float, so the result is the same to the last bit)."""
        return (self.overhead_s + self._non_attention_of(decodes) + self.per_sequence_s * (decodes - 1)
                + (self.decode_call_s + self.decode_context_s * context_tokens + self.decode_token_s * decodes))

    def _non_attention_of(self, tokens: int) -> float:
        """non_attention(tokens), remembered per token count (a step's count repeats step after step)."""
        seconds = self._non_attention_memo.get(tokens)
        if seconds is None:
            seconds = self._non_attention_memo[tokens] = self.non_attention(tokens)
        return seconds


def _fit_decodes(rows: dict[int, Curve]) -> tuple[float, float, float]:
    """Fit t = call + a * sum(contexts) + b * decodes to every (decodes, context) point of the decode table.

    Non-negative least squares on relative error, so short contexts weigh as much as long ones.
    """
    n = np.concatenate([np.full(len(c.xs), r, float) for r, c in rows.items()])
    ctx = np.concatenate([c.xs for c in rows.values()])
    t = np.concatenate([c.ys for c in rows.values()])
    weight = 1.0 / np.maximum(t, 1e-12)
    design = np.stack([np.ones_like(n), n * ctx, n], axis=1) * weight[:, None]
    coef, _ = nnls(design, t * weight)
    return float(coef[0]), float(coef[1]), float(coef[2])


def compare_tables(reference: Profile, other: Profile) -> dict[str, dict[str, float]]:
    """Per table, other / reference at the grid points both hold: {points, median, min, max} of the ratios."""
    out = {}
    ref, oth = reference.tables, other.tables

    def ratios(a: dict, b: dict) -> list[float]:
        return [_point("", b[k], "") / _point("", a[k], "") for k in a if k in b and _point("", a[k], "") > 0]

    for name in ("chunk_attention_s", "non_attention_s"):
        out[name] = ratios(ref[name], oth[name])
    out["decode_attention_s"] = [r for n in ref["decode_attention_s"] if n in oth["decode_attention_s"]
                                 for r in ratios(ref["decode_attention_s"][n], oth["decode_attention_s"][n])]
    for name in ("per_sequence_s", "step_overhead_s"):
        out[name] = ratios({0: ref[name]}, {0: oth[name]})
    for d in DIRECTIONS:
        out[f"copy_s.{d}"] = ratios({0: ref["copy_s"][d]["chunk_s"]}, {0: oth["copy_s"][d]["chunk_s"]})
    return {name: {"points": len(r), "median": float(np.median(r)), "min": min(r), "max": max(r)}
            for name, r in out.items() if r}
