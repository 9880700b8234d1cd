"""The core benchmark's driver works and really puts the cache under pressure (its timing is not asserted)."""
from pensieve.bench import run_core_bench


def test_core_bench_runs_under_pressure():
    r = run_core_bench(running=16, device_slots=2000, host_slots=1000, history_tokens=256, steps=400)
    assert r.decodes_per_step > 10
    assert r.admitted > 0 and r.swap_out_chunks > 0 and r.swap_in_chunks > 0 and r.dropped_chunks > 0
    assert r.mean_us_per_step > 0
