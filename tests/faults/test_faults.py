"""Every fault case comes out as intended or as a clear error (see tests/faults/cases.py)."""
import pytest

from .cases import cases
from .runner import run


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_fault(case, tmp_path):
    outcome, output = run(case, tmp_path)
    assert outcome in ("clear error", "as intended"), f"{case.category}: {outcome}\n{output[-2000:]}"
