"""The simulator: same scenario and seed give the same summary; results folders; infeasible input."""
import json

import pytest

from pensieve.config import parse_scenario
from pensieve.workload import Conversation, Turn, Workload, build_workload
from pensieve.core import rng_for
from sim.driver import simulate

from .helpers import AffineCost

BASE = {
    "name": "t",
    "seed": 7,
    "model": "smollm2-135m",
    "cache": {"device_gb": 0.4, "host_gb": 0.4, "policy": "pensieve"},
    "workload": {"type": "synthetic", "conversations": 40, "arrival_rate": 1.0, "think_time_s": 5},
}


def run(data):
    scenario = parse_scenario(data)
    return simulate(scenario, build_workload(scenario.workload, rng_for(scenario)), AffineCost(), progress=False)


def strip_wall(summary):
    return {k: v for k, v in summary.items() if k != "wall_s"}


def test_same_scenario_and_seed_same_summary():
    a, b = run(BASE), run(BASE)
    assert strip_wall(a.summary) == strip_wall(b.summary)
    c = run({**BASE, "seed": 8})
    assert strip_wall(c.summary) != strip_wall(a.summary)


@pytest.mark.parametrize("policy", ["pensieve", "lru", "stateless"])
def test_steps_chained_without_events_give_the_results_of_one_event_per_step(policy):
    """The server runs quiet steps back to back; with an event per step every number is the same."""
    data = {**BASE, "cache": {**BASE["cache"], "policy": policy}}
    scenario = parse_scenario(data)
    workload = build_workload(scenario.workload, rng_for(scenario))
    chained = simulate(scenario, workload, AffineCost(), progress=False)
    stepwise = simulate(scenario, workload, AffineCost(), progress=False, chain_steps=False)
    assert strip_wall(chained.summary) == strip_wall(stepwise.summary)
    assert chained.summary["steps"] > 10 * chained.summary["requests"]
    assert chained.timeline == stepwise.timeline
    fields = ("id", "arrival", "admitted", "first_token", "finish", "generated", "gpu_hit_tokens", "recomputed_tokens")
    assert [[getattr(r, f) for f in fields] for r in chained.finished] == \
        [[getattr(r, f) for f in fields] for r in stepwise.finished]


def test_every_turn_finishes_and_the_books_balance():
    r = run(BASE)
    s = r.summary
    assert s["unfinished"] == 0 and s["requests"] == len(r.finished) > 40
    t = s["tokens"]
    assert t["gpu_hit"] + t["cpu_hit"] + t["recomputed"] == t["history"]
    assert abs(sum(s["hit_rate"].values()) - 1) < 1e-9
    assert s["swap_bytes"]["out"] > 0  # the small cache was under pressure
    for req in r.finished:  # a later turn is sent only after the previous answer plus think time
        assert req.first_token >= req.arrival and req.finish >= req.first_token


def test_policies_differ_as_expected_under_pressure():
    results = {p: run({**BASE, "cache": {**BASE["cache"], "policy": p}}).summary for p in
               ("pensieve", "pensieve-gpu", "stateless")}
    assert results["stateless"]["hit_rate"]["miss"] == 1.0
    assert results["pensieve-gpu"]["hit_rate"]["cpu"] == 0.0
    assert results["pensieve"]["hit_rate"]["miss"] < results["pensieve-gpu"]["hit_rate"]["miss"]
    assert results["pensieve"]["tokens"]["recomputed"] < results["stateless"]["tokens"]["recomputed"]


def test_think_time_is_respected():
    scenario = parse_scenario(BASE)
    workload = Workload([Conversation("a", 1.0, [Turn(10, 5), Turn(10, 5, think_s=30.0)])])
    r = simulate(scenario, workload, AffineCost(), progress=False)
    first, second = sorted(r.finished, key=lambda q: q.turn)
    assert first.arrival == 1.0 and second.arrival == pytest.approx(first.finish + 30.0)


def test_simulate_command_writes_the_results_folder(tmp_path, monkeypatch):
    import yaml

    from pensieve.cli import main
    from sim import commands

    monkeypatch.setattr(commands, "build_cost_model", lambda scenario, source: AffineCost())
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(BASE))
    out = tmp_path / "out"
    assert main(["simulate", str(path), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("mode", "policy", "requests", "duration_s", "wall_s", "throughput_rps", "output_tokens_per_s",
                "normalized_latency_ms", "ttft_s", "tokens", "hit_rate", "swap_bytes"):
        assert key in summary
    rows = (out / "requests.csv").read_text().splitlines()
    assert len(rows) == summary["requests"] + 1
    for name in ("scenario.yaml", "timeline.csv", "hit_rates.png", "ttft_by_turn.png", "occupancy.png"):
        assert (out / name).stat().st_size > 0


def test_infeasible_scenarios_are_refused_before_simulating(tmp_path):
    import yaml

    from pensieve.cli import main

    tiny = {**BASE, "cache": {"device_gb": 0.005, "host_gb": 0}, "workload": {**BASE["workload"], "max_context": 4096}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny))
    assert main(["simulate", str(path), "--quiet", "--out", str(tmp_path / "o")]) == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    path.write_text(yaml.safe_dump({**BASE, "workload": {"type": "trace", "path": str(empty)}}))
    assert main(["simulate", str(path), "--quiet", "--out", str(tmp_path / "o")]) == 2
    path.write_text(yaml.safe_dump({**BASE, "workload": {**BASE["workload"], "arrival_rate": 0}}))
    assert main(["simulate", str(path), "--quiet", "--out", str(tmp_path / "o")]) == 2


class InterruptingCost(AffineCost):
    """Ctrl-C after a number of steps, as a user would press it mid-run."""

    def __init__(self, after_steps: int) -> None:
        self.left = after_steps

    def step_time_s(self, plan, chunk_tokens: int) -> float:
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return super().step_time_s(plan, chunk_tokens)


def test_ctrl_c_keeps_what_finished():
    scenario = parse_scenario(BASE)
    workload = build_workload(scenario.workload, rng_for(scenario))
    full = simulate(scenario, workload, AffineCost(), progress=False)
    cut = simulate(scenario, workload, InterruptingCost(after_steps=full.summary["steps"] // 2), progress=False)
    assert cut.interrupted and cut.summary["interrupted"]
    assert 0 < cut.summary["requests"] == len(cut.finished) < full.summary["requests"]
    assert cut.summary["unfinished"] == workload.requests - len(cut.finished)
    # the turns that finished are the same turns, at the same times, as in the whole run
    whole = {(r.conversation_id, r.turn): r.finish for r in full.finished}
    assert all(whole[(r.conversation_id, r.turn)] == r.finish for r in cut.finished)


def test_simulate_command_writes_the_finished_turns_on_ctrl_c(tmp_path, monkeypatch):
    import yaml

    import sim.commands as commands
    from pensieve.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(BASE))
    monkeypatch.setattr(commands, "build_cost_model", lambda scenario, source: InterruptingCost(after_steps=200))
    assert main(["simulate", str(path), "--quiet", "--out", str(tmp_path / "out")]) == 130
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["interrupted"] and summary["requests"] > 0
    rows = (tmp_path / "out" / "requests.csv").read_text().strip().splitlines()
    assert len(rows) == summary["requests"] + 1  # header


def test_open_loop_at_the_closed_loops_own_send_times_gives_the_same_run():
    """Sending each turn when the closed-loop run sent it reproduces that run: the same turns
    admitted the same way, the same hits, and the same times up to float rounding."""
    scenario = parse_scenario(BASE)
    workload = build_workload(scenario.workload, rng_for(scenario))
    closed = simulate(scenario, workload, AffineCost(), progress=False)
    send_at = {(r.conversation_id, r.turn): r.arrival for r in closed.finished}
    opened = simulate(scenario, workload, AffineCost(), progress=False, send_at=send_at)
    assert opened.summary["hit_rate"] == closed.summary["hit_rate"]
    assert opened.summary["tokens"] == closed.summary["tokens"]
    assert opened.summary["requests"] == closed.summary["requests"]
    assert abs(opened.summary["normalized_latency_ms"]["mean"] - closed.summary["normalized_latency_ms"]["mean"]) \
        < 1e-6 * closed.summary["normalized_latency_ms"]["mean"]
    later = {key: t + 5.0 for key, t in send_at.items()}  # every turn 5 s later: a different run
    shifted = simulate(scenario, workload, AffineCost(), progress=False, send_at=later)
    assert shifted.summary["requests"] == closed.summary["requests"]
    assert min(r.arrival for r in shifted.finished) >= 5.0
