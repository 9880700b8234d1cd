"""Tensor parallelism: one GPU's share of a model, the all-reduces it adds, and the tiers it sizes."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pensieve.analytical import (GPUS, all_reduce_s, analytical_profile, non_attention_s, tensor_parallel_s,
                                 decode_attention_s)
from pensieve.config import ScenarioError, parse_scenario
from pensieve.core import build_cost_model, build_scheduler
from pensieve.models import model_spec, shard
from pensieve.profile import ProfileError, check_profile_matches, profile_from_dict

A100 = GPUS["a100-80gb"]
PROFILES = Path(__file__).resolve().parents[2] / "profiles"


def test_a_shard_splits_heads_kv_heads_and_the_mlp_and_replicates_too_few_kv_heads():
    opt = shard(model_spec("opt-66b"), 4)
    assert (opt.heads, opt.kv_heads, opt.intermediate_size, opt.hidden_size) == (18, 18, 9216, 9216)
    assert opt.kv_bytes_per_token * 4 == model_spec("opt-66b").kv_bytes_per_token
    llama = shard(model_spec("llama-2-70b"), 16)  # 8 KV heads over 16 GPUs: one copy of a head on each
    assert (llama.heads, llama.kv_heads) == (4, 1)
    assert llama.kv_bytes_per_token * 8 == model_spec("llama-2-70b").kv_bytes_per_token
    assert shard(model_spec("opt-13b"), 1) == model_spec("opt-13b")
    with pytest.raises(ValueError, match="tensor_parallel 3 does not split model llama-2-70b evenly: heads 64"):
        shard(model_spec("llama-2-70b"), 3)


def test_an_all_reduce_is_a_ring_over_the_bus_bandwidth_plus_its_latency():
    assert all_reduce_s(A100, 1e9, 1) == 0
    assert all_reduce_s(A100, 1e9, 4) == pytest.approx(10e-6 + 1.5 * 1e9 / 240e9)
    with pytest.raises(ValueError, match="no GPU interconnect"):
        all_reduce_s(GPUS["a100-80gb"].__class__(**{**vars(A100), "interconnect_bandwidth": 0.0}), 1e6, 2)


def test_a_tensor_parallel_profile_is_one_gpus_share_plus_the_all_reduces():
    whole = model_spec("opt-66b")
    gpu = shard(whole, 4)
    data = analytical_profile(whole, A100, tensor_parallel=4)
    tables = data["tables"]
    assert data["tensor_parallel"] == 4 and data["model"]["name"] == "opt-66b"
    for tokens in (1, 256, 4096):
        expected = non_attention_s(gpu, A100, tokens) + tensor_parallel_s(whole, A100, 4, tokens)
        assert tables["non_attention_s"][tokens] == pytest.approx(expected, rel=1e-3)
    # two all-reduces per layer: a one-token decode step pays 128 latencies on OPT-66B's 64 layers
    assert tensor_parallel_s(whole, A100, 4, 1) > 128 * 10e-6
    assert tables["decode_attention_s"][64][4096] == pytest.approx(decode_attention_s(gpu, A100, 64, 4096), rel=1e-3)
    assert tables["copy_s"]["device_to_host"]["bytes_per_chunk"] == 32 * gpu.kv_bytes_per_token
    # a decode step of the 66B model on 4 GPUs is slower than the 13B one's on one, but under 66/13 times it
    one = analytical_profile(model_spec("opt-13b"), A100)["tables"]["non_attention_s"][1]
    assert one < tables["non_attention_s"][1] < 66 / 13 / 4 * one * 1.5


def scenario(**changes):
    data = {"name": "tp", "model": "opt-66b", "tensor_parallel": 4,
            "profile": str(PROFILES / "4xa100-80gb-opt-66b-float16.yaml"),
            "cache": {"device_gb": 40, "host_gb": 160}, "workload": {"conversations": 4}}
    data.update(changes)
    return parse_scenario(data, "tp.yaml")


def test_the_tiers_hold_each_gpus_share_of_every_tokens_kv():
    sched = build_scheduler(scenario())
    per_gpu_chunk = 32 * shard(model_spec("opt-66b"), 4).kv_bytes_per_token
    assert sched.cache.device.capacity == int(40e9 // per_gpu_chunk)
    assert sched.cache.host.capacity == int(160e9 // per_gpu_chunk)
    single = build_scheduler(scenario(tensor_parallel=1, profile=None))
    assert sched.cache.device.capacity == pytest.approx(4 * single.cache.device.capacity, abs=4)


def test_a_profile_for_another_degree_is_refused_with_the_command_that_writes_one():
    with pytest.raises(ProfileError, match=r"split over 4 GPU\(s\).*tensor_parallel: 2.*--tensor-parallel 2"):
        build_cost_model(scenario(tensor_parallel=2), "tp.yaml")
    profile = profile_from_dict(yaml.safe_load((PROFILES / "4xa100-80gb-opt-66b-float16.yaml").read_text()))
    check_profile_matches(profile, model_spec("opt-66b"), "x", 4)
    with pytest.raises(ScenarioError, match="tensor_parallel 5 does not split model opt-66b evenly"):
        scenario(tensor_parallel=5)

