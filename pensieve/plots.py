"""Plots of a results folder and of sweeps, as PNG files (matplotlib, headless)."""
from __future__ import annotations

import multiprocessing
import os
from collections import defaultdict
from pathlib import Path

from .outputs import atomic_path
from .signals import ignore_interrupts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(folder: str | Path, summary: dict, rows: list[dict], timeline: list[dict]) -> list[Path]:
    """Hit rates by tier, time to first token by turn index, and cache occupancy over time."""
    plt = _pyplot()
    folder = Path(folder)
    written = []

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    rates = summary["hit_rate"]
    ax.bar(["device hit", "host hit", "recomputed"], [rates["gpu"], rates["cpu"], rates["miss"]],
           color=["tab:green", "tab:blue", "tab:red"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of history tokens")
    ax.set_title(f"{summary['policy']} ({summary['mode']})")
    written.append(_save(fig, folder / "hit_rates.png"))

    by_turn = defaultdict(list)
    for row in rows:
        by_turn[int(row["turn"])].append(float(row["ttft_s"]))
    if by_turn:
        turns = sorted(by_turn)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(turns, [sum(by_turn[t]) / len(by_turn[t]) for t in turns], marker="o")
        ax.set_xlabel("turn index")
        ax.set_ylabel("mean time to first token (s)")
        ax.set_title("time to first token by turn")
        written.append(_save(fig, folder / "ttft_by_turn.png"))

    if timeline:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        t = [p["time_s"] for p in timeline]
        ax.plot(t, [p["device_used"] / max(p["device_capacity"], 1) for p in timeline], label="device tier")
        if timeline[0]["host_capacity"]:
            ax.plot(t, [p["host_used"] / p["host_capacity"] for p in timeline], label="host tier")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("slots in use")
        ax.legend()
        ax.set_title("cache occupancy")
        written.append(_save(fig, folder / "occupancy.png"))
    return written


def plot_sweep(folder: str | Path, rows: list[dict], target_ms: float | None = None) -> list[Path]:
    """Normalized latency against throughput, one line per policy (the paper's main figure),
    and hit rates by policy."""
    plt = _pyplot()
    folder = Path(folder)
    by_policy = defaultdict(list)
    for row in rows:
        by_policy[row["policy"]].append(row)
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, points in sorted(by_policy.items()):
        points.sort(key=lambda r: r["throughput_rps"])
        ax.plot([p["throughput_rps"] for p in points], [p["lat_mean"] for p in points], marker="o", label=policy)
    if target_ms:
        ax.axhline(target_ms, color="grey", linestyle="--", linewidth=1, label="latency target")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("mean normalized latency (ms/token)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("latency against throughput")
    written = [_save(fig, folder / "latency_vs_throughput.png")]

    fig, ax = plt.subplots(figsize=(6, 4))
    policies = sorted(by_policy)
    # hit rates at each policy's highest-throughput point
    best = [max(by_policy[p], key=lambda r: r["throughput_rps"]) for p in policies]
    bottom = [0.0] * len(policies)
    for key, label, color in (("hit_gpu", "device hit", "tab:green"), ("hit_cpu", "host hit", "tab:blue"),
                              ("hit_miss", "recomputed", "tab:red")):
        values = [b[key] for b in best]
        ax.bar(policies, values, bottom=bottom, label=label, color=color)
        bottom = [a + v for a, v in zip(bottom, values)]
    ax.set_ylabel("share of history tokens")
    ax.set_title("where history was found (highest load)")
    ax.legend()
    written.append(_save(fig, folder / "hit_rates_by_policy.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


class PlotWorker:
    """Draws plots in a forked process, so that importing matplotlib (a good part of a short
    simulation's wall time) overlaps the simulation on another core. Start it before the work,
    `submit` a plot once its data exist, and `wait` for the files. Where fork is unavailable, or
    there is one core, the plots are drawn here, at `submit`.
    """

    def __init__(self) -> None:
        self._process = self._conn = None
        self._pending = 0
        if hasattr(os, "fork") and (os.cpu_count() or 1) > 1:
            context = multiprocessing.get_context("fork")
            self._conn, child = context.Pipe()
            self._process = context.Process(target=_plot_jobs, args=(child,), daemon=True)
            self._process.start()
            child.close()
        self._written: list[Path] = []

    def submit(self, name: str, *args) -> None:
        """Draw `name` (plot_run or plot_sweep) with `args`."""
        if self._process is None:
            self._written += PLOTTERS[name](*args)
            return
        self._conn.send((name, args))
        self._pending += 1

    def wait(self) -> list[Path]:
        """The files written; raises what a plot raised. Ends the worker."""
        try:
            while self._pending:
                ok, value = self._conn.recv()
                self._pending -= 1
                if not ok:
                    raise RuntimeError(f"plotting failed: {value}")
                self._written += value
        finally:
            self.close()
        return self._written

    def close(self) -> None:
        if self._process is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass  # the worker is gone already
            self._conn.close()
            self._process.join(timeout=10)
            if self._process.is_alive():  # still drawing after a second interrupt: end it
                self._process.terminate()
                self._process.join(timeout=5)
            self._process = None


def _plot_jobs(conn) -> None:
    """The worker: import matplotlib at once, then draw what arrives until told to stop."""
    ignore_interrupts()  # Ctrl-C and SIGTERM are the parent's: it still has this plot what finished
    _pyplot()
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        name, args = job
        try:
            conn.send((True, PLOTTERS[name](*args)))
        except Exception as exc:  # reported to, and raised in, the parent
            conn.send((False, f"{type(exc).__name__}: {exc}"))


PLOTTERS = {"plot_run": plot_run, "plot_sweep": plot_sweep}
