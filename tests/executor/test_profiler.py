"""`pensieve profile`: a quick profile of a tiny random model end to end, --check on it, and the clear errors."""

from __future__ import annotations

import pytest
import torch
import yaml

from executor import profiler
from executor.profiling import memory
from executor.profiling.check import check_batches, print_check, run_check
from executor.profiling.grid import Forward, Grid
from executor.models import ModelLoadError
from pensieve.cli import build_parser
from pensieve.models import model_spec
from pensieve.profile import ProfileCostModel, ProfileError, load_profile


def args(*argv: str):
    return build_parser().parse_args(["profile", *argv])


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    """A --quick profile of random:tiny-llama with 16-token chunks (a few seconds)."""
    path = tmp_path_factory.mktemp("profiles") / "tiny.yaml"
    assert profiler.main(args("--model", "random:tiny-llama", "--quick", "--chunk-tokens", "16",
                              "--device", "cpu", "--out", str(path))) == 0
    return path


def test_quick_profile_writes_every_table(tiny_profile):
    profile = load_profile(tiny_profile)
    t = profile.tables
    assert profile.source == "measured" and profile.device == "cpu" and profile.chunk_tokens == 16
    assert profile.model.layers == 3 and profile.model.name == "random:tiny-llama"
    assert sorted(t["chunk_attention_s"]) == [16, 32, 64, 128, 256, 512]
    assert sorted(t["decode_attention_s"]) == [1, 4] and sorted(t["prefill_attention_s"]) == [32, 64]
    assert min(t["non_attention_s"]) == 1 and max(t["non_attention_s"]) == 64
    point = t["chunk_attention_s"][64]
    assert 0 < point["p10"] <= point["median"] <= point["p90"]
    assert t["copy_s"]["host_to_device"]["bytes_per_chunk"] == 16 * profile.model.kv_bytes_per_token
    assert set(profile.data["versions"]) >= {"python", "torch", "transformers"}
    assert not profile.overlap_copies  # a CPU copy blocks the step
    assert ProfileCostModel(profile).chunk_recompute_s(100, 16) > 0


def test_check_runs_mixed_batches_against_the_profile(tiny_profile, capsys):
    profile = load_profile(tiny_profile)
    rows = run_check(profile, args("--quick"), torch.device("cpu"))
    assert len(rows) == 7 + 3 and all(r.measured_s > 0 and r.predicted_s > 0 for r in rows)
    assert [r.anchor for r in rows] == [False] * 7 + [True] * 3  # grid points measure the machine's drift
    labels = {r.batch.label for r in rows}
    assert {"resume, swap-in + swap-out", "decodes", "long prefill past the rows"} <= labels
    assert all(r.interpolated_s > 0 for r in rows)  # the profile has a prefill table: both surfaces predict
    print_check(rows, profile)
    out = capsys.readouterr().out
    assert "fitted prefill surface" in out and "interpolated prefill surface" in out
    assert "predicted from the others" in out and "long prefills past the rows (1)" in out


def test_check_batches_resume_with_recompute_and_a_gap(tiny_profile):
    batches = check_batches(load_profile(tiny_profile), 6)
    spans, ctx = batches[1].prefills[0]
    assert spans[0][0] == 0 and spans[1][0] > spans[0][1] and ctx == spans[1][0] + spans[1][1]
    assert batches[1].swap_in >= 1 and batches[4].swap_out >= 2


def test_check_refuses_a_profile_of_another_model(tiny_profile):
    with pytest.raises(ProfileError, match="differ in architecture"):
        profiler.main(args("--check", str(tiny_profile), "--model", "random:tiny-gpt2", "--quick"))


def test_check_refuses_a_profile_of_another_device(tiny_profile, tmp_path):
    data = yaml.safe_load(tiny_profile.read_text())
    data["device"] = "a100-80gb"
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match="for device 'a100-80gb'"):
        profiler.main(args("--check", str(other), "--quick"))


def test_check_refuses_a_profile_missing_a_table(tiny_profile, tmp_path):
    data = yaml.safe_load(tiny_profile.read_text())
    del data["tables"]["non_attention_s"]
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match="tables.non_attention_s: missing"):
        profiler.main(args("--check", str(broken)))


def test_a_device_that_does_not_exist():
    with pytest.raises(ModelLoadError, match="cuda:7"):
        profiler.main(args("--model", "random:tiny-llama", "--device", "cuda:7", "--quick"))


def test_a_model_too_large_is_refused_before_allocating(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * 2**30)
    with pytest.raises(ModelLoadError, match=r"needs about 2\d\.\d GB .* only 2\.1 GB is free"):
        profiler.main(args("--model", "random:llama-2-13b", "--dtype", "float16", "--quick", "--device", "cpu"))


def test_analytical_profiles_for_published_gpus(tmp_path):
    out = tmp_path / "a100.yaml"
    assert profiler.main(args("--analytical", "a100-80gb", "--model", "llama-2-13b", "--out", str(out))) == 0
    profile = load_profile(out)
    assert profile.source == "analytical" and profile.model == model_spec("llama-2-13b")
    assert profile.data["analytical"]["peak_tflop_s"]["float16"] == 312.0
    with pytest.raises(ValueError, match="known devices are a100-80gb, h100-80gb, cpu"):
        profiler.main(args("--analytical", "tpu-v9", "--out", str(out)))
    with pytest.raises(ValueError, match="needs a model preset"):
        profiler.main(args("--analytical", "a100-80gb", "--model", "my/model", "--out", str(out)))


def test_grid_of_a_full_cpu_profile():
    grid = Grid.choose(model_spec("smollm2-135m", "float32"), torch.device("cpu"), 32, quick=False)
    assert grid.kv_lens == (32, 64, 128, 256, 512, 1024, 2048, 4096)
    assert grid.queries == (64, 128, 256, 512) and grid.decodes == (1, 2, 4, 8, 16)
    assert grid.fresh[-1] == 2048 and grid.repeats == 5  # whole-history prefills to half the context
    assert all(f.decodes * f.kv_len <= grid.decode_tokens for f in grid.forwards())


def test_full_cpu_grid_measures_whole_history_prefills_to_half_the_context():
    grid = Grid.choose(model_spec("smollm2-135m"), torch.device("cpu"), 32, quick=False)
    assert max(grid.fresh) == max(grid.kv_lens) // 2 > max(grid.queries)
    assert Forward(max(grid.fresh), max(grid.fresh)) in grid.forwards()
    quick = Grid.choose(model_spec("smollm2-135m"), torch.device("cpu"), 32, quick=True)
    assert max(quick.fresh) == max(quick.queries)  # --quick stays under a minute
