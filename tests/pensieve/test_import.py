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



def imported_modules(package: str) -> dict[str, set[str]]:
    """Every module each file of a package imports, lazy imports inside functions included."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / package
    found = {}
    for path in sorted(root.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                names.add(base)
        found[str(path.relative_to(root.parent))] = names
    return found


def test_executor_never_imports_sim_and_no_core_module_imports_the_command_line():
    """The real engine depends on the core, never on the simulator (DESIGN.md); the core's modules
    import no command line (only `pensieve.cli` itself is one)."""
    for path, names in imported_modules("executor").items():
        assert not {n for n in names if n == "sim" or n.startswith("sim.")}, path
    for path, names in imported_modules("pensieve").items():
        assert not names & {"pensieve.cli", ".cli"}, path
