"""Scenario loading: valid files build a core; bad ones name the file, the key path and what is allowed."""
import pytest
import yaml

from pensieve.config import ScenarioError, load_scenario
from pensieve.core import build_scheduler

GOOD = {
    "name": "tiny",
    "seed": 3,
    "model": "smollm2-135m",
    "cache": {"device_gb": 0.1, "host_gb": 0.2, "policy": "lru"},
    "scheduler": {"max_batch_tokens": 512},
}


def write(tmp_path, data, name="s.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_a_valid_scenario_builds_the_core(tmp_path):
    scenario = load_scenario(write(tmp_path, GOOD))
    sched = build_scheduler(scenario)
    # SmolLM2 fp32: 2 x 30 layers x 3 kv heads x 64 x 4 bytes = 46,080 bytes per token
    assert scenario.model_spec.kv_bytes_per_token == 46080
    assert sched.cache.device.capacity == int(0.1e9 // (46080 * 32))
    assert sched.cache.host.capacity == int(0.2e9 // (46080 * 32))
    assert sched.cache.policy.name == "lru" and sched.max_batch_tokens == 512
    assert sched.decode_reserve == 0.10 and sched.swap_out_threshold == 0.25


def test_pensieve_gpu_gets_no_host_tier(tmp_path):
    data = {**GOOD, "cache": {**GOOD["cache"], "policy": "pensieve-gpu"}}
    assert build_scheduler(load_scenario(write(tmp_path, data))).cache.host.capacity == 0


@pytest.mark.parametrize(
    "patch, key, message",
    [
        ({"cache": {"device_gb": 1, "polcy": "lru"}}, "cache.polcy", "unknown key; allowed here: device_gb"),
        ({"cache": {"device_gb": 1, "policy": "fifo"}}, "cache.policy.type", "allowed: pensieve, pensieve-gpu"),
        ({"cache": {"device_gb": -1}}, "cache.device_gb", "greater than 0"),
        ({"cache": {"host_gb": 1}}, "cache.device_gb", "is required"),
        ({"model": "gpt-9"}, "model", "known presets"),
        ({"scheduler": {"decode_reserve": 1.5}}, "scheduler.decode_reserve", "less than 1"),
        ({"sceduler": {}}, "sceduler", "unknown key; allowed here: name, seed, seeds, model"),
        ({"cache": {"device_gb": 1, "eviction_batch": 0.01}}, "cache", "eviction_batch is gone"),
    ],
)
def test_bad_scenarios_name_file_key_and_what_is_allowed(tmp_path, patch, key, message):
    path = write(tmp_path, {**GOOD, **patch})
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    text = str(info.value)
    assert text.startswith(str(path)) and info.value.key == key and message in text, text


def test_policy_params_reach_the_policy_or_are_refused_by_name(tmp_path):
    policy = {"type": "tests.pensieve.user_policy:AgedCost", "params": {"power": 2.0}}
    scenario = load_scenario(write(tmp_path, {**GOOD, "cache": {"device_gb": 1, "policy": policy}}))
    assert build_scheduler(scenario).cache.policy.power == 2.0
    policy["params"] = {"pwr": 2.0}
    scenario = load_scenario(write(tmp_path, {**GOOD, "cache": {"device_gb": 1, "policy": policy}}))
    with pytest.raises(ValueError, match="cache.policy.params: AgedCost does not accept them"):
        build_scheduler(scenario)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ScenarioError, match="cannot be read"):
        load_scenario(tmp_path / "missing.yaml")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(write(tmp_path, "cache: [unclosed"))
    with pytest.raises(ScenarioError, match="a scenario is a mapping"):
        load_scenario(write(tmp_path, "- 1\n- 2\n"))


def test_model_by_dimensions(tmp_path):
    dims = {"name": "mine", "architecture": "llama", "layers": 2, "hidden_size": 64, "heads": 4, "kv_heads": 2,
            "head_dim": 16, "intermediate_size": 128, "vocab_size": 100, "max_context": 512}
    scenario = load_scenario(write(tmp_path, {**GOOD, "model": dims}))
    assert scenario.model_spec.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4


# ---------------------------------------------------------------- --set overrides and paths


def test_set_overrides_are_read_as_yaml_and_validated_like_the_file(tmp_path):
    path = write(tmp_path, GOOD)
    scenario = load_scenario(path, ["cache.host_gb=4", "cache.policy=pensieve", "workload.arrival_rate=.inf",
                                    "sweep.workload.arrival_rate=[0.1, 0.2]", "seed=7"])
    assert scenario.cache.host_gb == 4 and scenario.cache.policy.type == "pensieve" and scenario.seed == 7
    assert scenario.workload.arrival_rate == float("inf")
    assert scenario.sweep == {"workload.arrival_rate": [0.1, 0.2]}
    assert scenario.cache.device_gb == 0.1  # the rest of the file stands
    with pytest.raises(ScenarioError) as info:
        load_scenario(path, ["cache.polcy=lru"])
    assert info.value.key == "cache.polcy" and "allowed here: device_gb" in str(info.value)
    assert "--set cache.polcy=lru" in str(info.value)  # the error says the key came from the command line
    with pytest.raises(ScenarioError, match="cache.device_gb: Input should be greater than 0"):
        load_scenario(path, ["cache.device_gb=-2"])
    for bad in ("cache.host_gb", "=4", "cache..host_gb=4"):
        with pytest.raises(ScenarioError, match="expected key.path=value"):
            load_scenario(path, [bad])
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(path, ["cache.host_gb=[1"])


def test_paths_resolve_from_the_scenario_then_the_shipped_profiles_and_say_where_they_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing relative to the working directory helps
    copied = write(tmp_path, {**GOOD, "profile": "profiles/cpu-smollm2-135m-float32.yaml"}, "copied.yaml")
    scenario = load_scenario(copied)
    assert scenario.profile.endswith("profiles/cpu-smollm2-135m-float32.yaml") and scenario.profile.startswith("/")
    (tmp_path / "mine.yaml").write_text("x")  # next to the scenario wins
    assert load_scenario(write(tmp_path, {**GOOD, "profile": "mine.yaml"})).profile == str(tmp_path / "mine.yaml")
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, {**GOOD, "profile": "nowhere.yaml"}))
    assert info.value.key == "profile" and "'nowhere.yaml' was not found; looked in:" in str(info.value)
    assert str(tmp_path / "nowhere.yaml") in str(info.value)
    with pytest.raises(ScenarioError, match="workload.path: 'gone.jsonl' was not found"):
        load_scenario(write(tmp_path, {**GOOD, "workload": {"type": "trace", "path": "gone.jsonl"}}))
