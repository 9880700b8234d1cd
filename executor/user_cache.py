"""The folder where the executor keeps what it builds once per machine: compiled CPU kernels
(kernels/) and converted GGUF models (gguf/).

PENSIEVE_CACHE names it; by default $XDG_CACHE_HOME/pensieve, else ~/.cache/pensieve.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "PENSIEVE_CACHE"


def cache_root() -> Path:
    value = os.environ.get(CACHE_ENV, "").strip()
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "pensieve"
