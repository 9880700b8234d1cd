"""`pensieve selfcheck --small` on this CPU, as CI runs it: equivalence under forced swaps, drops and a
suspension, a tiny quick profile, a small validation on it, and the report."""

from __future__ import annotations

import json
from pathlib import Path

from pensieve.cli import main


def test_selfcheck_small_form_checks_equivalence_profiles_validates_and_reports(tmp_path: Path) -> None:
    status = main(["selfcheck", "--small", "--device", "cpu", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert status == (0 if report["ok"] else 1)
    checks = {c["check"]: c for c in report["checks"]}
    equivalence = checks["equivalence: random:tiny-llama"]
    assert equivalence["ok"], equivalence["summary"]
    assert all(count > 0 for count in equivalence["forced"].values())  # swaps, drops and a suspension happened
    assert checks["profile"]["ok"] and Path(checks["profile"]["path"]).is_file()
    # Smoke only for the validation's verdict: a tiny model's timings on a shared machine are noise.
    assert "worst gated error" in checks["validation"]["summary"]
    assert (tmp_path / "validate" / "validation.json").is_file()
    page = (tmp_path / "report.md").read_text()
    assert page.startswith("# pensieve selfcheck:") and "torch" in page and "equivalence" in page
