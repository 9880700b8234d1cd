"""CPU runtime settings for serving: the allocator and torch's thread count.

Allocator: glibc serves allocations above its mmap threshold (dynamic, at most 32 MiB) with fresh
mmaps and trims the heap top on free, so a step's large temporaries (projections of a long
prefill, attention gathers) were page-faulted afresh in every layer: on this VM a fault costs
~3 us per 4 KiB page, and the decode steps of a SmolLM2 run spent more time in the kernel than
computing. A fixed 32 MiB threshold with trimming off keeps freed memory mapped for reuse.

Threads (every rule the executor uses is here): PENSIEVE_THREADS when set; one for tiny models;
otherwise, serving, `ThreadGovernor` runs with every core that other processes leave free
(`fixed_threads`, `serving_threads`); profiling measures with one (`profiling_threads`). OpenMP threads wait for each other at the end of every parallel region; when
another process keeps a core busy, the thread on that core loses whole time slices, and on a 2-core
machine two threads ran SmolLM2's decode steps ~10x slower than one (while on a free machine two are
~1.6x faster than one).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import time
from collections import Counter
from collections.abc import Iterator

import torch

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
ALLOCATOR = "glibc mallopt: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 2 GiB"
THREADS_ENV = "PENSIEVE_THREADS"


@functools.cache
def tune_allocator() -> bool:
    """Keep freed memory mapped (glibc; a no-op returning False elsewhere). Process-wide and idempotent."""
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    try:
        libc = ctypes.CDLL(path)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError, TypeError):
        return False


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def env_threads() -> int | None:
    """PENSIEVE_THREADS as a positive int, None when unset; ValueError when it is not one."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{THREADS_ENV}={value!r}: give a positive number of threads")
    return threads


def fixed_threads(dims: dict | None = None) -> int | None:
    """A fixed intra-op thread count for serving on the CPU: PENSIEVE_THREADS, else one for tiny models
    (hidden size under 256, whose small matmuls only lose to thread hand-offs); None: let a
    `ThreadGovernor` decide."""
    threads = env_threads()
    if threads is not None:
        return threads
    if dims is not None and dims.get("hidden_size", 1 << 30) < 256:
        return 1
    return None


def serving_threads(dims: dict | None = None) -> int:
    """`fixed_threads`, else every available core (what the governor picks on an idle machine)."""
    threads = fixed_threads(dims)
    return available_cores() if threads is None else threads


def profiling_threads() -> int:
    """Intra-op threads the profiler measures with on the CPU: PENSIEVE_THREADS, else one. With another
    process on the other core, two threads made small matmuls ~20x slower and timings swing; one
    thread gives tables that hold. The count is recorded in the profile, and validation serves with
    it (a comparison must not measure a thread setting)."""
    return env_threads() or 1


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with `threads` intra-op threads (None: as they are) and restore the caller's setting after."""
    previous = torch.get_num_threads()
    if threads is not None and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


class ThreadGovernor:
    """Torch's intra-op thread count while serving on a CPU that other processes may share.

    Every `interval_s` (checked between steps) it reads from /proc/stat how much CPU the other
    processes used, niced ones not counted (they yield to us), and runs with the cores they leave
    free: all of them on an idle machine, fewer (at least one) while another job computes. Without
    /proc/stat it keeps every core. `steps` counts the steps run at each thread count.
    """

    def __init__(self, cores: int | None = None, interval_s: float = 1.0) -> None:
        self.cores = cores or available_cores()
        self.interval_s = interval_s
        self.steps: Counter[int] = Counter()
        self._last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(monotonic seconds, CPU seconds of all non-niced work, CPU seconds of this process)."""
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:9]]
            ticks = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            return None
        user, _nice, system, _idle, _iowait, irq, softirq, steal = fields
        own = os.times()
        return time.monotonic(), (user + system + irq + softirq + steal) / ticks, own.user + own.system

    def others_busy(self) -> float | None:
        """Cores the other processes kept busy since the last call (None without /proc/stat or time)."""
        now = self._sample()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0]))

    def choose(self, others: float | None) -> int:
        """Every core but those the others keep busy; a core they use less than half of counts as free."""
        if others is None:
            return self.cores
        return max(1, min(self.cores, int(self.cores - others + 0.5)))

    def start(self, probe_s: float = 0.25) -> int:
        """Measure the machine for `probe_s` (this process idle) and set the thread count; returns it."""
        self._last = self._sample()
        time.sleep(probe_s)
        threads = self.choose(self.others_busy())
        torch.set_num_threads(threads)
        return threads

    def resume(self) -> None:
        """The engine had nothing to do and has work again: run with every core and start the next
        measurement now. What other processes did while it waited (a client starting, another
        server shutting down) says nothing about contention for the steps to come: decided on it, a
        whole 1500-token prefill once ran on one thread of two, 3.8 s instead of 2.0 s. A process that
        keeps competing is seen again within `interval_s`."""
        self._last = self._sample()
        if torch.get_num_threads() != self.cores:
            torch.set_num_threads(self.cores)

    def step_done(self) -> None:
        """Count the step just run; re-decide once `interval_s` has passed since the last decision."""
        self.steps[torch.get_num_threads()] += 1
        if self._last is not None and time.monotonic() - self._last[0] < self.interval_s:
            return
        threads = self.choose(self.others_busy())
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
