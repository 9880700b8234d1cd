"""Sweep points on a Ray cluster: a local head node started by the test, reached by its address."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pensieve.config import expand_sweep, parse_scenario
from sim import sweep

PROFILE = Path(__file__).resolve().parents[2] / "profiles" / "a100-80gb-opt-13b-float16.yaml"
SCENARIO = {
    "name": "ray",
    "model": "opt-13b",
    "profile": str(PROFILE),  # the workers build their own cost model from it
    "cache": {"device_gb": 10, "host_gb": 20},
    "workload": {"type": "synthetic", "conversations": 20, "arrival_rate": 0.5, "think_time_s": 5},
    "sweep": {"cache.policy": ["pensieve", "stateless"]},
}


@pytest.fixture(scope="module")
def ray_address():
    pytest.importorskip("ray", reason="ray is in the test extra")
    ray_cli = shutil.which("ray") or f"{sys.prefix}/bin/ray"
    started = subprocess.run([ray_cli, "start", "--head", "--port=6399", "--num-cpus=2", "--include-dashboard=false",
                              "--disable-usage-stats"], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    yield "127.0.0.1:6399"
    import ray

    ray.shutdown()
    subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)


def test_points_run_on_a_ray_cluster(ray_address):
    points = expand_sweep(parse_scenario(SCENARIO))
    local = sweep.run_points(points, "<local>", jobs=1)
    on_ray = sweep.run_points(points, "<ray>", jobs=1, ray_address=ray_address)
    assert [r["policy"] for r in on_ray] == ["pensieve", "stateless"]
    assert on_ray[1]["recomputed_fraction"] == 1.0 and on_ray[0]["recomputed_fraction"] < 1.0
    # the same simulation on the cluster as here (wall time aside)
    strip = lambda rows: [{k: v for k, v in r["summary"].items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(on_ray) == strip(local)
