"""The built-in GGUF model converted once and loaded from the cache: the same weights, config and
tokenizer as the conversion, and a cache that cannot be written never stops a load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import executor.models as models
from executor.gguf_cache import COMPLETE
from executor.tokenizer import render_chat

MESSAGES = [{"role": "user", "content": "Héllo, what's 2+2? Answer in one word."}]


def test_a_cached_model_is_the_converted_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network) -> None:
    monkeypatch.setenv("PENSIEVE_CACHE", str(tmp_path))
    converted = models.load_model(None)
    [entry] = (tmp_path / "gguf").iterdir()
    assert (entry / COMPLETE).is_file()

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again although the cache holds the model")

    monkeypatch.setattr(models, "_convert_gguf", must_not_convert)
    cached = models.load_model(None)
    assert cached.dims == converted.dims and cached.name == converted.name
    for key in ("rope_theta", "rms_norm_eps", "tie_word_embeddings", "eos_token_id", "bos_token_id"):
        assert getattr(cached.model.config, key, None) == getattr(converted.model.config, key, None), key
    a, b = converted.model.state_dict(), cached.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = render_chat(converted.tokenizer, MESSAGES, add_generation_prompt=True)
    assert render_chat(cached.tokenizer, MESSAGES, add_generation_prompt=True) == text
    ids = converted.tokenizer.encode(text, add_special_tokens=False)
    assert cached.tokenizer.encode(text, add_special_tokens=False) == ids
    assert cached.tokenizer.decode(ids) == converted.tokenizer.decode(ids)
    assert cached.tokenizer.eos_token_id == converted.tokenizer.eos_token_id


def test_a_cache_that_is_off_or_cannot_be_written_only_costs_the_conversion(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network) -> None:
    monkeypatch.setenv("PENSIEVE_GGUF_CACHE", "0")
    assert models.load_model(None).dims["layers"] == 30
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.delenv("PENSIEVE_GGUF_CACHE")
    monkeypatch.setenv("PENSIEVE_CACHE", str(blocked))  # mkdir under a file fails
    assert models.load_model(None).dims["layers"] == 30
