"""Every scenario the project ships loads: its keys validate, its sweep points validate, its paths resolve."""
from pathlib import Path

import pytest

from pensieve.config import expand_sweep, load_scenario, replicate

SCENARIOS = sorted((Path(__file__).resolve().parents[2] / "scenarios").rglob("*.yaml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_scenario_loads_with_every_sweep_point(path):
    scenario = load_scenario(path)
    assert scenario.profile is None or Path(scenario.profile).is_file()
    points = replicate(expand_sweep(scenario, str(path)), scenario)
    assert len(points) == max(1, len(expand_sweep(scenario, str(path)))) * scenario.seeds


def test_there_are_shipped_scenarios():
    assert len(SCENARIOS) >= 20
