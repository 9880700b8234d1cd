"""The plot worker: the same files whether drawn in a forked process or here, and errors reach the caller."""
import pytest

from pensieve import plots

SUMMARY = {"policy": "pensieve", "mode": "sim", "hit_rate": {"gpu": 0.5, "cpu": 0.3, "miss": 0.2},
           "quantiles": {"percent": [0, 50, 100], "ttft_s": [0.1, 0.2, 0.4], "normalized_latency_ms": [20, 30, 90]}}
ROWS = [{"turn": t, "ttft_s": 0.1 * (t + 1)} for t in range(4) for _ in range(3)]
TIMELINE = [{"time_s": float(t), "device_used": t, "device_capacity": 10, "host_used": 2 * t, "host_capacity": 20}
            for t in range(5)]


@pytest.mark.parametrize("cores", [2, 1])
def test_plot_worker_writes_the_run_plots(tmp_path, monkeypatch, cores):
    monkeypatch.setattr(plots.os, "cpu_count", lambda: cores)  # 1: drawn in this process
    worker = plots.PlotWorker()
    assert (worker._process is not None) == (cores > 1)
    worker.submit("plot_run", tmp_path, SUMMARY, ROWS, TIMELINE)
    written = worker.wait()
    assert sorted(p.name for p in written) == ["hit_rates.png", "latency_cdf.png", "occupancy.png", "ttft_by_turn.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_a_failing_plot_is_raised_in_the_caller(tmp_path):
    worker = plots.PlotWorker()
    worker.submit("plot_run", tmp_path / "missing" / "folder", SUMMARY, ROWS, TIMELINE)
    with pytest.raises((RuntimeError, FileNotFoundError), match="No such file"):
        worker.wait()
    assert worker._process is None  # ended either way
