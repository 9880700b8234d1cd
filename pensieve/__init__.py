"""Pensieve: stateful multi-turn LLM serving's KV-cache core, and the Python API of its simulator.

`pensieve.simulate` and `pensieve.sweep` (pensieve/api.py) import the simulator and pandas only when
called: importing this package needs neither, nor torch.
"""
from .api import Results, simulate, sweep

__all__ = ["Results", "simulate", "sweep"]
