"""The real executor: model loading, a two-tier paged KV store, paged attention and the model runner."""

from executor.kv_store import PagedKVStore
from executor.models import LoadedModel, ModelLoadError, load_model, preset_dims
from executor.runner import ModelRunner, SeqInput, sample

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "ModelRunner",
    "PagedKVStore",
    "SeqInput",
    "load_model",
    "preset_dims",
    "sample",
]
