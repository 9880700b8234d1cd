"""Fixtures for executor tests: cached tiny random models and a network guard."""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable

import pytest
import torch

from executor.models import LoadedModel, load_model


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """One intra-op thread: these small models gain nothing from more, and two OpenMP threads on a
    busy 2-core machine make small matmuls ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model() -> Callable[[str], LoadedModel]:
    """Seeded random models by preset name, built once per session (tests never change their weights)."""
    return functools.cache(lambda preset: load_model(f"random:{preset}"))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt to open a network connection."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
