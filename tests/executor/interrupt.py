"""Ctrl-C in the middle of a real run, as a user would press it."""
from __future__ import annotations

import pytest


def press_ctrl_c_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """Make the engine raise KeyboardInterrupt on its step after `steps` steps."""
    import executor.engine as engine_module

    step = engine_module.Engine.step
    calls = {"n": 0}

    def interrupted_step(self, now):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt
        return step(self, now)

    monkeypatch.setattr(engine_module.Engine, "step", interrupted_step)
