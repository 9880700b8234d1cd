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
        written.append(_plot_ttft_by_turn(plt, folder, by_turn))
    if (summary.get("quantiles") or {}).get("ttft_s"):
        written.append(_plot_cdfs(plt, folder / "latency_cdf.png", {summary["policy"]: summary}))

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


def _plot_ttft_by_turn(plt, folder: Path, by_turn: dict[int, list[float]]) -> Path:
    """Mean TTFT per turn index with its 95% confidence interval, each point labelled with its count."""
    from .stats import estimate

    turns = sorted(by_turn)
    estimates = [estimate(by_turn[t]) for t in turns]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar(turns, [e.mean for e in estimates], yerr=[0 if e.n < 2 else e.half_width for e in estimates],
                marker="o", capsize=3)
    for t, e in zip(turns, estimates):
        ax.annotate(f"n={e.n}", (t, e.mean), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
    ax.set_xlabel("turn index")
    ax.set_ylabel("mean time to first token (s)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=min(turns) - 0.5)
    ax.set_title("time to first token by turn (95% CI; n requests)")
    return _save(fig, folder / "ttft_by_turn.png")


def _plot_cdfs(plt, path: Path, summaries: dict[str, dict]) -> Path:
    """CDFs of TTFT and normalized latency, one line per policy, from the summaries' quantiles."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for policy, summary in sorted(summaries.items()):
        q = summary.get("quantiles") or {}
        if not q.get("ttft_s"):
            continue
        share = [p / 100 for p in q["percent"]]
        axes[0].plot(q["ttft_s"], share, label=policy)
        axes[1].plot(q["normalized_latency_ms"], share, label=policy)
    for ax, label in zip(axes, ("time to first token (s)", "normalized latency (ms/token)")):
        ax.set_xlabel(label)
        ax.set_ylabel("share of requests")
        ax.set_xscale("symlog", linthresh=1e-3 if "(s)" in label else 1.0)
        ax.set_ylim(0, 1.01)
        ax.legend(fontsize=8)
    fig.suptitle("latency distributions")
    return _save(fig, path)


LOAD_AXIS = "workload.arrival_rate"


def _error(row: dict, key: str) -> float:
    half = row.get(f"{key}_ci95")
    return 0.0 if half is None or half != half else half


def plot_sweep(folder: str | Path, rows: list[dict], target_ms: float | None = None, axes: list[str] | None = None,
               search: dict | None = None, summaries: list[dict] | None = None) -> list[Path]:
    """The plots that follow the sweep's axes (`axes`, without the seed; rows are means over seeds where
    replicated, with `<metric>_ci95` columns drawn as error bars):
    - a load axis (or none): normalized latency against throughput per policy, points labelled with their
      arrival rates, the latency target and each policy's throughput at it (`search`) drawn on it;
    - a cache-size axis (`cache.*_gb`): hit rate per tier and latency against the size, per policy;
    - any other axis: latency against it, per policy;
    - hit rates by policy at the highest arrival rate (named in the title), CDFs of TTFT and normalized
      latency per policy there (from `summaries`), and per turn index the TTFT speedup over stateless."""
    plt = _pyplot()
    folder = Path(folder)
    axes = [a for a in (axes or []) if a != "cache.policy"]
    written: list[Path] = []
    if not rows:
        return written
    by_policy = defaultdict(list)
    for row in rows:
        by_policy[row["policy"]].append(row)
    others = [a for a in axes if a != LOAD_AXIS]
    if LOAD_AXIS in axes or not axes:
        written.append(_latency_vs_throughput(plt, folder, by_policy, others, target_ms, search))
    for axis in others:
        written += _against_axis(plt, folder, by_policy, axis, [a for a in axes if a != axis])
    loads = [r.get("arrival_rate") for r in rows if r.get("arrival_rate") is not None]
    top = max(loads) if loads else None
    at_top = {p: [r for r in points if r.get("arrival_rate") == top] or points for p, points in by_policy.items()}
    chosen = {p: points[0] for p, points in at_top.items()}
    written.append(_hit_rates_by_policy(plt, folder, chosen, top, others))
    if summaries:
        top_summaries = {}
        for summary in summaries:
            point = summary.get("sweep_point", {})
            if top is not None and summary.get("arrival_rate", point.get(LOAD_AXIS, top)) != top:
                continue
            top_summaries.setdefault(summary["policy"], summary)  # the first seed and first value of other axes
        if top_summaries:
            written.append(_plot_cdfs(plt, folder / "latency_cdf_by_policy.png", top_summaries))
            if "stateless" in top_summaries and len(top_summaries) > 1:
                written.append(_speedup_by_turn(plt, folder, top_summaries))
    return written


def _latency_vs_throughput(plt, folder: Path, by_policy: dict, others: list[str], target_ms, search) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    for policy, points in sorted(by_policy.items()):
        for key, group in _lines(points, "throughput_rps", others).items():  # one line per value of the others
            label = _label(policy, others, key)
            line = ax.errorbar([p["throughput_rps"] for p in group], [p["norm_latency_mean_ms"] for p in group],
                               xerr=[_error(p, "throughput_rps") for p in group],
                               yerr=[_error(p, "norm_latency_mean_ms") for p in group], marker="o", capsize=2,
                               label=label)
            for p in group:
                if p.get("arrival_rate") is not None:
                    ax.annotate(f"{p['arrival_rate']:.3g}/s", (p["throughput_rps"], p["norm_latency_mean_ms"]),
                                textcoords="offset points", xytext=(3, 3), fontsize=6, color=line[0].get_color())
            found = (search or {}).get(policy)
            if found and found.get("throughput_rps", {}).get("n") and target_ms:
                t = found["throughput_rps"]
                ax.errorbar([t["mean"]], [target_ms], xerr=[0 if t["n"] < 2 else t["half_width"]], marker="*",
                            markersize=11, color=line[0].get_color(), capsize=3, linestyle="none")
    if target_ms:
        ax.axhline(target_ms, color="grey", linestyle="--", linewidth=1, label="latency target (* throughput at it)")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("mean normalized latency (ms/token)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("latency against throughput (labels: arrival rate, new conversations/s)")
    return _save(fig, folder / "latency_vs_throughput.png")


def _against_axis(plt, folder: Path, by_policy: dict, axis: str, rest: list[str]) -> list[Path]:
    """Latency against a non-load axis per policy; for a cache-size axis, hit rates per tier too. Each value
    of the other axes gets its own line."""
    name = axis.split(".")[-1]
    unit = " (GB)" if axis.endswith("_gb") else " (s)" if axis.endswith("_s") else ""
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, points in sorted(by_policy.items()):
        for key, group in _lines(points, axis, rest).items():
            ax.errorbar([p[axis] for p in group], [p["norm_latency_mean_ms"] for p in group],
                        yerr=[_error(p, "norm_latency_mean_ms") for p in group], marker="o", capsize=2,
                        label=_label(policy, rest, key))
    ax.set_xlabel(f"{axis}{unit}")
    ax.set_ylabel("mean normalized latency (ms/token)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.set_title(f"latency against {name}")
    written.append(_save(fig, folder / f"latency_vs_{name}.png"))
    if axis.startswith("cache."):
        fig, ax = plt.subplots(figsize=(6, 4))
        styles = {"gpu_hit_fraction": ("device hit", "-"), "cpu_hit_fraction": ("host hit", "--"),
                  "recomputed_fraction": ("recomputed", ":")}
        for policy, points in sorted(by_policy.items()):
            color = None
            for key, group in _lines(points, axis, rest).items():
                for metric, (tier, style) in styles.items():
                    line = ax.errorbar([p[axis] for p in group], [p[metric] for p in group],
                                       yerr=[_error(p, metric) for p in group], linestyle=style, marker="o",
                                       markersize=3, capsize=2, color=color,
                                       label=f"{_label(policy, rest, key)}: {tier}")
                    color = line[0].get_color()
        ax.set_xlabel(f"{axis}{unit}")
        ax.set_ylabel("share of history tokens")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=6)
        ax.set_title(f"where history was found, against {name}")
        written.append(_save(fig, folder / f"hit_rates_vs_{name}.png"))
    return written


def _lines(points: list[dict], axis: str, rest: list[str]) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for p in points:
        groups[tuple(p.get(a) for a in rest)].append(p)
    return {k: sorted(g, key=lambda r: r[axis]) for k, g in groups.items()}


def _label(policy: str, rest: list[str], key: tuple) -> str:
    return policy + (" " + ", ".join(f"{a.split('.')[-1]}={v}" for a, v in zip(rest, key)) if rest else "")


def _hit_rates_by_policy(plt, folder: Path, chosen: dict[str, dict], top, others: list[str]) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    policies = sorted(chosen)
    bottom = [0.0] * len(policies)
    for key, label, color in (("gpu_hit_fraction", "device hit", "tab:green"),
                              ("cpu_hit_fraction", "host hit", "tab:blue"),
                              ("recomputed_fraction", "recomputed", "tab:red")):
        values = [chosen[p][key] for p in policies]
        ax.bar(policies, values, bottom=bottom, label=label, color=color,
               yerr=[_error(chosen[p], key) for p in policies], capsize=3)
        bottom = [a + v for a, v in zip(bottom, values)]
    ax.set_ylabel("share of history tokens")
    where = f"arrival rate {top:.3g}/s, the highest" if top is not None else "the sweep's point"
    fixed = ", ".join(f"{a.split('.')[-1]}={chosen[policies[0]].get(a)}" for a in others)
    ax.set_title(f"where history was found ({where}{'; ' + fixed if fixed else ''})", fontsize=9)
    ax.legend()
    return _save(fig, folder / "hit_rates_by_policy.png")


def _speedup_by_turn(plt, folder: Path, summaries: dict[str, dict]) -> Path:
    """Per turn index, stateless's mean TTFT over each policy's: how much reusing history speeds the
    prefill up as conversations grow (the paper's per-turn comparison)."""
    base = summaries["stateless"]["by_turn"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, summary in sorted(summaries.items()):
        if policy == "stateless":
            continue
        turns = [t for t in summary["by_turn"] if t in base and summary["by_turn"][t]["ttft_mean_s"] > 0]
        turns.sort(key=int)
        ax.plot([int(t) for t in turns], [base[t]["ttft_mean_s"] / summary["by_turn"][t]["ttft_mean_s"] for t in turns],
                marker="o", label=policy)
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.set_xlabel("turn index")
    ax.set_ylabel("TTFT speedup over stateless (x)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("prefill speedup by turn")
    return _save(fig, folder / "speedup_by_turn.png")


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
