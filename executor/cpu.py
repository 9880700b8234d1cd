"""CPU runtime settings for serving: the allocator and torch's thread count.

Allocator: glibc serves allocations above its mmap threshold (dynamic, at most 32 MiB) with fresh
mmaps and trims the heap top on free, so a step's large temporaries (projections of a long
prefill, attention gathers) were page-faulted afresh in every layer: on this VM a fault costs
~3 us per 4 KiB page, and the decode steps of a SmolLM2 run spent more time in the kernel than
computing. A fixed 32 MiB threshold with trimming off keeps freed memory mapped for reuse.

Threads: all cores the process may run on, unless PENSIEVE_THREADS says otherwise. On a machine
where another process keeps a core busy, OpenMP threads wait on each other and fewer threads (often
1) are faster: set PENSIEVE_THREADS=1 there.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
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


def serving_threads(dims: dict | None = None) -> int:
    """Intra-op threads for serving on the CPU: PENSIEVE_THREADS, else one for tiny models (hidden size
    under 256, whose small matmuls only lose to thread hand-offs), else every available core."""
    threads = env_threads()
    if threads is not None:
        return threads
    if dims is not None and dims.get("hidden_size", 1 << 30) < 256:
        return 1
    return available_cores()


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with `threads` intra-op threads and restore the caller's setting (None: leave it)."""
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
