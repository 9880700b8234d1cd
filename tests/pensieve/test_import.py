"""The core must load without torch, transformers or simpy (DESIGN.md), checked in a fresh interpreter."""
import subprocess
import sys

PROBE = """
import importlib, pkgutil, sys
import pensieve
for m in pkgutil.walk_packages(pensieve.__path__, "pensieve."):
    importlib.import_module(m.name)
print(sorted({"torch", "transformers", "simpy"} & set(sys.modules)))
"""


def test_pensieve_imports_without_torch_transformers_or_simpy():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
