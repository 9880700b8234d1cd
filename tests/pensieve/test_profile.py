"""Profiles: YAML round trip and validation, interpolation rules, and the cost model's step times."""
from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from pensieve.analytical import GPUS, analytical_profile
from pensieve.models import PRESETS, ModelSpec, model_spec
from pensieve.plan import PrefillItem, StepPlan
from pensieve.profile import (Curve, ProfileCostModel, ProfileError, Surface, check_profile_matches, compare_tables,
                              dump_profile, held_out_errors, load_profile, prefill_points, profile_from_dict)

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
CHUNK = 32


def linear_profile(overlap: bool = True, prefill_table: bool = False) -> dict:
    """A profile whose tables are exact lines, so every prediction has a closed form:
    chunk attention 1e-6 * L, decodes 1e-3 + 2e-7 * n * L + 1e-5 * n, non-attention 1e-2 + 1e-4 * n."""
    data = analytical_profile(model_spec("llama-2-13b"), GPUS["a100-80gb"], CHUNK)
    kv = [32 * 2**i for i in range(7)]  # 32 .. 2048
    tables = data["tables"]
    tables["chunk_attention_s"] = {L: 1e-6 * L for L in kv}
    tables["decode_attention_s"] = {n: {L: 1e-3 + 2e-7 * n * L + 1e-5 * n for L in kv} for n in (1, 2, 4, 8)}
    tables["non_attention_s"] = {n: 1e-2 + 1e-4 * n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256)}
    tables["per_sequence_s"] = {"median": 5e-4, "p10": 4e-4, "p90": 6e-4}
    tables["step_overhead_s"] = 1e-3
    for direction in ("device_to_host", "host_to_device"):
        tables["copy_s"][direction]["chunk_s"] = 4e-3
        tables["copy_s"][direction]["layer_chunk_s"] = 1e-4
    tables.pop("prefill_attention_s", None)  # the roofline's own; these tests give theirs or none
    if prefill_table:
        tables["prefill_attention_s"] = {q: {L: 2e-6 * L * q / CHUNK for L in kv if L >= q} for q in (64, 128, 256)}
    data["overlap_copies"] = overlap
    return data


def plan(decodes: list[int] = (), prefills: list[tuple[list[tuple[int, int]], int]] = (), swap_in: int = 0,
         swap_out: int = 0) -> StepPlan:
    items = [PrefillItem(100 + i, i, list(spans), ctx) for i, (spans, ctx) in enumerate(prefills)]
    return StepPlan(0, list(range(len(decodes))), sum(decodes), items,
                    [(i, i) for i in range(swap_out)], [(i, i) for i in range(swap_in)])


# ---------------------------------------------------------------- file format


def test_round_trip_is_identical(tmp_path):
    data = linear_profile(prefill_table=True)
    first = dump_profile(data, tmp_path / "a.yaml")
    loaded = load_profile(tmp_path / "a.yaml")
    assert loaded.data == data == first.data
    dump_profile(loaded.data, tmp_path / "b.yaml")
    assert (tmp_path / "a.yaml").read_text() == (tmp_path / "b.yaml").read_text()
    assert loaded.model == model_spec("llama-2-13b") and loaded.source == "analytical"
    assert loaded.device == "a100-80gb" and loaded.chunk_tokens == CHUNK


def test_one_grid_point_per_line(tmp_path):
    dump_profile(linear_profile(), tmp_path / "p.yaml")
    lines = (tmp_path / "p.yaml").read_text().splitlines()
    assert "  chunk_attention_s:" in lines and "    32: 3.2e-05" in lines


@pytest.mark.parametrize("edit, key, words", [
    (lambda d: d["tables"].pop("chunk_attention_s"), "tables.chunk_attention_s", "missing"),
    (lambda d: d["tables"].pop("copy_s"), "tables.copy_s", "missing"),
    (lambda d: d["tables"]["decode_attention_s"].pop(1), "tables.decode_attention_s.1", "single-decode row"),
    (lambda d: d.update(chunk_tokens="32"), "chunk_tokens", "expected a positive number of tokens"),
    (lambda d: d.update(overlap_copies="yes"), "overlap_copies", "true or false"),
    (lambda d: d.update(source="guessed"), "source", "measured"),
    (lambda d: d.update(dtype="float32"), "dtype", "differs from model.dims.dtype"),
    (lambda d: d["model"]["dims"].pop("layers"), "model.dims", "not a valid model description"),
    (lambda d: d["tables"]["non_attention_s"].update({"many": 1.0}), "tables.non_attention_s.many", "integers"),
    (lambda d: d["tables"]["chunk_attention_s"].update({64: -1.0}), "tables.chunk_attention_s.64", ">= 0"),
    (lambda d: d["tables"]["chunk_attention_s"].update({64: {"p10": 1.0}}), "chunk_attention_s.64.median",
     "missing"),
    (lambda d: d["tables"].update(non_attention_s={1: 1.0}), "tables.non_attention_s", "at least 2"),
    (lambda d: d["tables"].update(prefill_attention_s={64: {32: 1.0, 64: 1.0}}), "prefill_attention_s.64",
     "KV lengths >= them"),
    (lambda d: d.pop("analytical"), "analytical", "roofline figures"),
    (lambda d: d["versions"].pop("python"), "versions.python", "missing"),
])
def test_validation_names_the_key_and_what_is_expected(edit, key, words):
    data = linear_profile()
    edit(data)
    with pytest.raises(ProfileError) as err:
        profile_from_dict(data, "my.yaml")
    assert "my.yaml" in str(err.value) and key in str(err.value) and words in str(err.value)


def test_unreadable_and_non_yaml_files(tmp_path):
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("tables: [unclosed")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ProfileError, match="expected a mapping"):
        load_profile(tmp_path / "list.yaml")


def test_check_profile_matches_names_differences_and_the_fix():
    profile = profile_from_dict(linear_profile())
    check_profile_matches(profile, model_spec("llama-2-13b"), "scenario.yaml")
    renamed = ModelSpec(**{**model_spec("llama-2-13b").to_dict(), "name": "my-llama", "max_context": 4096})
    check_profile_matches(profile, renamed, "scenario.yaml")  # names and context limits do not change timings
    with pytest.raises(ProfileError) as err:
        check_profile_matches(profile, model_spec("opt-13b"), "scenario.yaml")
    message = str(err.value)
    assert "scenario.yaml" in message and "kv_heads 10 vs 40" in message and "pensieve profile" in message
    with pytest.raises(ProfileError, match="dtype 'float16' vs 'float32'"):
        check_profile_matches(profile, model_spec("llama-2-13b", "float32"), "scenario.yaml")


# ---------------------------------------------------------------- interpolation


def test_curve_interpolates_linearly_clamps_below_and_extrapolates_the_last_segment():
    curve = Curve([32, 64, 128], [1.0, 2.0, 6.0])
    assert curve(48) == pytest.approx(1.5)
    assert curve(96) == pytest.approx(4.0)
    assert curve(8) == 1.0  # below the grid: the first point (fixed costs dominate there)
    assert curve(256) == pytest.approx(6.0 + 4.0 / 64 * 128)  # past it: the last two points' slope


def test_curve_makes_noisy_medians_non_decreasing():
    curve = Curve([1, 2, 4, 8], [1.0, 0.8, 2.0, 3.0])
    assert list(curve.xs) == [1, 2, 4, 8]
    assert all(a <= b for a, b in zip(curve.ys, curve.ys[1:]))
    assert curve(1) == curve(2) == pytest.approx(0.9)


def test_surface_rows_and_diagonal():
    rows = {1: Curve([1, 100], [1.0, 1.0]), 32: Curve([32, 256], [10.0, 80.0]), 64: Curve([64, 256], [30.0, 160.0])}
    diagonal = Curve([32, 64], [10.0, 30.0])
    s = Surface(rows, diagonal)
    assert s(32, 128) == pytest.approx(rows[32](128))
    assert s(48, 256) == pytest.approx(120.0)  # halfway between rows 32 and 64
    # 48 queries over 48 KV tokens: row 64 does not reach KV 48, so t runs to the diagonal at 48.
    assert s(48, 48) == pytest.approx(diagonal(48))
    assert s(128, 256) == pytest.approx(160.0 + 80.0 * 2)  # past the last row: linear from the last two


# ---------------------------------------------------------------- the cost model


def test_components_follow_the_tables():
    cm = ProfileCostModel(profile_from_dict(linear_profile()))
    assert cm.token_s == pytest.approx(1e-4)
    assert cm.chunk_recompute_s(0, CHUNK) == pytest.approx(1e-6 * 32 + 32 * 1e-4)
    assert cm.chunk_recompute_s(1000, CHUNK) == pytest.approx(1e-6 * 1032 + 32 * 1e-4)
    # The decode fit recovers the generating line exactly.
    assert (cm.decode_call_s, cm.decode_context_s, cm.decode_token_s) == pytest.approx((1e-3, 2e-7, 1e-5), rel=1e-6)
    assert cm.decodes_s(3, 3000) == pytest.approx(1e-3 + 2e-7 * 3000 + 3e-5)
    assert cm.non_attention_s(100, 3) == pytest.approx(1e-2 + 1e-2 + 2 * 5e-4)
    assert cm.non_attention_s(1000, 1) == pytest.approx(1e-2 + 1e-4 * 1000)  # per-token past the grid


def test_prefill_integrates_the_chunk_table_over_each_token_prefix():
    cm = ProfileCostModel(profile_from_dict(linear_profile()))
    # chunk attention 1e-6 * L for 32 queries is 1e-6 / 32 * (L - 15.5) per query token attending to its prefix.
    per_token = 1e-6 / 32
    fresh = sum(per_token * (p + 1 + 15.5) for p in range(256))
    assert cm.prefill_s([(0, 256)], 256) == pytest.approx(fresh)
    split = [(0, 64), (500, 50)]  # recomputed leading chunks and a new prompt after a 500-token history
    expected = sum(per_token * (p + 1 + 15.5) for s, n in split for p in range(s, s + n))
    assert cm.prefill_s(split, 550) == pytest.approx(expected, rel=0.01)


def test_interpolated_prefill_surface_reads_the_table():
    cm = ProfileCostModel(profile_from_dict(linear_profile(prefill_table=True)), "interpolated")
    assert cm.prefill_s([(0, 128)], 128) == pytest.approx(2e-6 * 128 * 4)  # the (128, 128) point
    assert cm.prefill_s([(0, 64), (900, 64)], 964) == pytest.approx(2e-6 * 964 * 4)  # row 128 at KV 964
    assert cm.attention_s(CHUNK, 512) == pytest.approx(1e-6 * 512)  # the chunk row is the chunk table


def kernel_shaped_profile(tile: int = 128) -> tuple[dict, object]:
    """A profile whose prefill points follow PrefillFit's form exactly, its causal kernel skipping `tile`-key tiles."""
    data = linear_profile(prefill_table=True)
    kv = [32 * 2**i for i in range(7)]

    def t(q: int, L: int) -> float:
        pairs = q * q / 2 + q * min(q, tile) / 2 if q == L else q * L
        return 1e-4 + 2e-6 * q + 3e-7 * L + 4e-9 * pairs

    data["tables"]["chunk_attention_s"] = {L: t(CHUNK, L) for L in kv}
    data["tables"]["prefill_attention_s"] = {q: {L: t(q, L) for L in kv if L >= q} for q in (64, 128, 256)}
    return data, t


def test_fitted_prefill_surface_recovers_the_kernel_shape_and_extends_past_the_rows():
    data, t = kernel_shaped_profile()
    assert ProfileCostModel(profile_from_dict(data)).prefill_surface == "interpolated"  # an analytical table
    data["source"] = "measured"
    cm = ProfileCostModel(profile_from_dict(data))
    assert cm.prefill_surface == "fitted" and cm.prefill_attention.causal_tile == 128  # this executor's kernel
    assert cm.prefill_attention.coef == pytest.approx([1e-4, 2e-6, 3e-7, 4e-9], rel=1e-6)
    for q, L in [(1000, 1000), (1000, 2048), (700, 3000), (40, 40), (100, 1500)]:
        spans = [(0, q)] if q == L else [(0, q // 2), (L - q + q // 2, q - q // 2)]
        assert cm.prefill_s(spans, L) == pytest.approx(t(q, L), rel=1e-6)
    held_out = held_out_errors(prefill_points(profile_from_dict(data)), cm.decode_row, CHUNK)
    assert np.max(np.abs(held_out["fitted"])) < 1e-6  # exact form: every point predicted from the others
    assert np.max(np.abs(held_out["interpolated"])) > 0.01  # the table's edges extrapolate between rows


def test_fitted_surface_never_falls_with_more_queries_or_more_context():
    cm = ProfileCostModel(profile_from_dict(kernel_shaped_profile(tile=64)[0]), "fitted")
    fresh = [cm.prefill_s([(0, n)], n) for n in range(33, 3000, 37)]
    assert fresh == sorted(fresh)
    for q in (40, 300, 900):  # resuming over more context never costs less than the fresh prefill
        longer = [cm.prefill_s([(L - q, q)], L) for L in range(q, 3000, 61)]
        assert longer == sorted(longer)
    with pytest.raises(ValueError, match="prefill_surface 'spline'"):
        ProfileCostModel(profile_from_dict(kernel_shaped_profile()[0]), "spline")


def test_step_time_adds_the_parts_without_copies():
    cm = ProfileCostModel(profile_from_dict(linear_profile(overlap=False)))
    p = plan(decodes=[300, 500], prefills=[([(0, 100)], 100)], swap_in=3, swap_out=2)
    compute = 1e-3 + cm.non_attention_s(102, 3) + cm.prefill_s([(0, 100)], 100) + cm.decodes_s(2, 800)
    assert cm.compute_s(p) == pytest.approx(compute)
    assert cm.step_time_s(p, CHUNK) == pytest.approx(compute + 5 * 4e-3)
    assert cm.step_time_s(plan(), CHUNK) == 0.0
    assert cm.step_time_s(plan(swap_out=2), CHUNK) == pytest.approx(8e-3)
    assert cm.step_time_s(plan(swap_in=2), 16) == pytest.approx(4e-3)  # half-size chunks copy in half the time


def test_swap_in_overlaps_compute_layer_by_layer():
    cm = ProfileCostModel(profile_from_dict(linear_profile(overlap=True)))
    layers = 40
    base = plan(decodes=[1000] * 8, prefills=[([(0, 200)], 200)])
    compute = cm.step_time_s(base, CHUNK)
    few = cm.step_time_s(plan(decodes=[1000] * 8, prefills=[([(0, 200)], 200)], swap_in=2), CHUNK)
    assert few == pytest.approx(compute + 2 * 4e-3 / layers)  # hidden but for the first layer's copy
    many = 500
    t_in = many * 4e-3
    assert t_in > compute
    heavy = cm.step_time_s(plan(decodes=[1000] * 8, prefills=[([(0, 200)], 200)], swap_in=many), CHUNK)
    assert heavy == pytest.approx(t_in + compute / layers)  # copy-bound: the last layer's compute sticks out
    # Swap-out fills the link while swap-in leaves it idle, and adds only past the step.
    assert cm.step_time_s(plan(decodes=[1000] * 8, prefills=[([(0, 200)], 200)], swap_out=3), CHUNK) == compute
    long_out = cm.step_time_s(plan(decodes=[1000] * 8, prefills=[([(0, 200)], 200)], swap_in=2, swap_out=many),
                              CHUNK)
    assert long_out == pytest.approx((many + 2) * 4e-3)


def _cost_models() -> list[ProfileCostModel]:
    models = [ProfileCostModel(profile_from_dict(linear_profile(prefill_table=True)))]
    models += [ProfileCostModel(load_profile(p)) for p in sorted(PROFILES.glob("*.yaml"))]
    return models


@pytest.mark.parametrize("cm", _cost_models(), ids=lambda cm: Path(cm.profile.path).stem)
def test_step_time_is_monotone_in_tokens_and_context(cm):
    rng = random.Random(7)
    for _ in range(200):
        ctx = rng.randrange(64, 3000)
        q = rng.randrange(2, min(ctx, 600))
        decodes = [rng.randrange(32, 3000) for _ in range(rng.randrange(0, 8))]
        t = cm.step_time_s(plan(decodes, [([(ctx - q, q)], ctx)]), CHUNK)
        more_queries = cm.step_time_s(plan(decodes, [([(ctx - q - 1, q + 1)], ctx)]), CHUNK)
        longer = cm.step_time_s(plan(decodes, [([(ctx + 100 - q, q)], ctx + 100)]), CHUNK)
        longer_decodes = cm.step_time_s(plan([d + 50 for d in decodes], [([(ctx - q, q)], ctx)]), CHUNK)
        assert t <= more_queries and t <= longer and t <= longer_decodes


@pytest.mark.parametrize("cm", _cost_models(), ids=lambda cm: Path(cm.profile.path).stem)
def test_chunk_recompute_cost_increases_with_context(cm):
    costs = [cm.chunk_recompute_s(l, CHUNK) for l in range(0, 16384, CHUNK)]
    assert all(a <= b for a, b in zip(costs, costs[1:])) and costs[-1] > costs[0] > 0


# ---------------------------------------------------------------- analytical profiles


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("model", ["opt-13b", "llama-2-13b"])
def test_analytical_magnitudes(gpu, model):
    cm = ProfileCostModel(profile_from_dict(analytical_profile(model_spec(model), GPUS[gpu])))
    prefill = cm.step_time_s(plan(prefills=[([(0, 2048)], 2048)]), CHUNK)
    assert 0.02 < prefill < 0.5  # 13B x 2048 tokens = 53 TFLOP: tens to hundreds of ms
    decode = cm.step_time_s(plan(decodes=[1024]), CHUNK)
    assert 0.005 < decode < 0.05  # reading 26 GB of weights
    # 64 decodes over 1K contexts read 64K tokens of KV on top: about KV bytes / bandwidth more.
    spec, roof = model_spec(model), GPUS[gpu]
    kv_read = 64 * 1024 * spec.kv_bytes_per_token / (roof.memory_bandwidth * roof.memory_efficiency)
    many = cm.step_time_s(plan(decodes=[1024] * 64), CHUNK)
    assert many - decode == pytest.approx(kv_read, rel=0.2)


def test_h100_is_faster_than_a100():
    a, h = (ProfileCostModel(profile_from_dict(analytical_profile(model_spec("opt-13b"), GPUS[g])))
            for g in ("a100-80gb", "h100-80gb"))
    p = plan(decodes=[500] * 16, prefills=[([(0, 1000)], 1000)], swap_in=4)
    assert h.step_time_s(p, CHUNK) < a.step_time_s(p, CHUNK)


def test_analytical_rejects_a_dtype_without_published_peak():
    with pytest.raises(ValueError, match="no peak FLOP/s for dtype 'float32'"):
        analytical_profile(model_spec("opt-13b", "float32"), GPUS["a100-80gb"])


# ---------------------------------------------------------------- shipped profiles


def test_shipped_profiles_load_and_match_their_presets():
    paths = sorted(PROFILES.glob("*.yaml"))
    assert {p.name for p in paths} >= {
        "cpu-smollm2-135m-float32.yaml", "a100-80gb-opt-13b-float16.yaml", "a100-80gb-llama-2-13b-float16.yaml",
        "h100-80gb-opt-13b-float16.yaml", "h100-80gb-llama-2-13b-float16.yaml",
        "4xa100-80gb-opt-66b-float16.yaml", "4xa100-80gb-llama-2-70b-float16.yaml"}
    for path in paths:
        profile = load_profile(path)
        preset = next(s for s in PRESETS.values() if f"-{s.name}-" in path.name)
        gpus = int(path.name.split("x", 1)[0]) if path.name[0].isdigit() else 1
        assert profile.tensor_parallel == gpus, path.name
        check_profile_matches(profile, preset.with_dtype(profile.dtype), path.name, gpus)


def test_compare_tables_reports_ratios():
    reference = profile_from_dict(linear_profile())
    doubled = copy.deepcopy(linear_profile())
    doubled["tables"]["chunk_attention_s"] = {k: 2 * v for k, v in doubled["tables"]["chunk_attention_s"].items()}
    ratios = compare_tables(reference, profile_from_dict(doubled))
    assert ratios["chunk_attention_s"] == {"points": 7, "median": 2.0, "min": 2.0, "max": 2.0}
    assert ratios["non_attention_s"]["median"] == 1.0


def test_profile_yaml_is_plain_yaml(tmp_path):
    dump_profile(linear_profile(), tmp_path / "p.yaml")
    raw = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert raw["tables"]["chunk_attention_s"][32] == pytest.approx(3.2e-5)


def test_scaled_cost_model_scales_times_and_keeps_the_profile() -> None:
    from pensieve.cost import ScaledCostModel

    cost = ProfileCostModel(profile_from_dict(linear_profile()))
    plan = StepPlan(1, [0, 1], 600, [PrefillItem(7, 7, [(0, 96)], 96)], [(0, 0)], [(1, 1)])
    scaled = ScaledCostModel(cost, 1.25)
    assert scaled.step_time_s(plan, CHUNK) == pytest.approx(1.25 * cost.step_time_s(plan, CHUNK))
    assert scaled.chunk_recompute_s(512, CHUNK) == pytest.approx(1.25 * cost.chunk_recompute_s(512, CHUNK))
    assert scaled.profile is cost.profile
    with pytest.raises(ValueError, match="positive"):
        ScaledCostModel(cost, 0.0)


@pytest.mark.parametrize("spans", [[(0, 40)], [(0, 64), (96, 100)], [(0, 2048), (2100, 64)], [(5, 3000)]])
def test_prefill_attention_without_a_table_sums_chunk_pieces(spans) -> None:
    """Both code paths (plain floats for short queries, numpy for long ones) give the piecewise sum."""
    cost = ProfileCostModel(profile_from_dict(linear_profile()))
    context = spans[-1][0] + spans[-1][1]
    expected = sum(min(CHUNK, s + n - a) / CHUNK * 1e-6 * ((a + min(a + CHUNK, s + n)) / 2 + CHUNK / 2)
                   for s, n in spans for a in range(s, s + n, CHUNK))
    assert cost.prefill_s(spans, context) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("cm", _cost_models(), ids=lambda cm: Path(cm.profile.path).stem)
def test_decode_only_steps_cost_what_the_general_path_computes_to_the_bit(cm):
    rng = random.Random(3)
    for _ in range(300):
        p = plan([rng.randrange(1, 16000) for _ in range(rng.randrange(1, 300))])
        general = cm.compute_s(p)  # no copies: the step is its compute
        assert cm.step_time_s(p, CHUNK) == general


def test_a_repaired_table_says_how_much_it_moved_in_seconds_where_a_median_was_zero():
    import numpy as np

    from pensieve.profile import Curve

    curve = Curve(np.array([1.0, 2.0, 3.0]), np.array([0.001, 0.0, 0.002]), name="non_attention_s")
    assert curve.repair.startswith("non_attention_s: 2 of 3 medians made nondecreasing, the largest moved by 0.0005 s")
    assert Curve(np.array([1.0, 2.0]), np.array([0.001, 0.002])).repair is None


# ---------------------------------------------------------------- fresh prefills past the rows


def with_fresh_past_rows(data: dict, points: dict) -> dict:
    data = copy.deepcopy(data)
    data["tables"]["fresh_prefill_attention_s"] = points
    return data


def test_fresh_prefills_past_the_rows_join_both_surfaces():
    data, t = kernel_shaped_profile()
    data = with_fresh_past_rows(data, {1024: t(1024, 1024) * 0.9, 2048: t(2048, 2048) * 0.9})
    profile = profile_from_dict(data)
    points = prefill_points(profile)
    assert [tuple(p[:2]) for p in points[-2:]] == [(1024, 1024), (2048, 2048)]
    interpolated = ProfileCostModel(profile, "interpolated")
    # A fresh prefill past the rows reads the diagonal (between its points); a resumed one extrapolates rows.
    assert interpolated.prefill_s([(0, 1536)], 1536) == pytest.approx(0.9 * (t(1024, 1024) + t(2048, 2048)) / 2)
    resumed = interpolated.prefill_s([(0, 1000), (1500, 36)], 1536)
    assert resumed == pytest.approx(t(1036, 1536), rel=1e-6)  # the kernel-shaped rows extend exactly
    fitted = ProfileCostModel(profile, "fitted")
    assert fitted.prefill_s([(0, 2048)], 2048) < t(2048, 2048)  # the cheaper fresh points pull the fit down


@pytest.mark.parametrize("change, key, message", [
    (lambda t: t.pop("prefill_attention_s"), "tables.fresh_prefill_attention_s", "needs the prefill_attention_s"),
    (lambda t: t["fresh_prefill_attention_s"].update({128: 1.0}), "tables.fresh_prefill_attention_s",
     "past the prefill_attention_s rows only"),
])
def test_fresh_prefill_table_errors_name_the_key(change, key, message):
    data, t = kernel_shaped_profile()
    data = with_fresh_past_rows(data, {1024: t(1024, 1024)})
    change(data["tables"])
    with pytest.raises(ProfileError, match=key) as caught:
        profile_from_dict(data, "p.yaml")
    assert message in str(caught.value) and "p.yaml" in str(caught.value)


@pytest.mark.parametrize("model", ["opt-13b", "llama-2-13b"])
def test_analytical_prefills_are_charged_the_whole_span_roofline(model):
    # Summing 32-token pieces, each reading the whole KV, charged an 8K fresh OPT-13B prefill 505 ms on the
    # A100 profile against the 126 ms of its own roofline: the profile now tabulates whole spans.
    from pensieve import analytical

    spec, roof = model_spec(model), GPUS["a100-80gb"]
    cm = ProfileCostModel(profile_from_dict(analytical_profile(spec, roof)))
    assert cm.prefill_surface == "interpolated"
    for q, L in [(8192, 8192), (3000, 3000), (1000, 6000), (96, 96), (700, 700)]:
        expected = analytical.attention_s(spec, roof, q, L)
        assert cm.prefill_s([(L - q, q)], L) == pytest.approx(expected, rel=0.04), (q, L)
    shipped = ProfileCostModel(load_profile(PROFILES / f"a100-80gb-{model}-float16.yaml"))
    assert shipped.prefill_s([(0, 8192)], 8192) == pytest.approx(analytical.attention_s(spec, roof, 8192, 8192),
                                                                 rel=0.01)
