"""SIGTERM handled as Ctrl-C: what cluster schedulers, `timeout` and Ray send must keep finished work.

A command runs inside `interrupts_kept()`: SIGTERM then raises `Terminated`, a KeyboardInterrupt,
where Ctrl-C would raise one, so every path that keeps finished work on Ctrl-C keeps it on SIGTERM
too. The command line exits 143 (128 + SIGTERM) after it, as a shell reports a process ended by
SIGTERM, and 130 after Ctrl-C.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised where Ctrl-C's KeyboardInterrupt would be."""


class _Received:
    """Which interrupting signal arrived last (None: none), for the exit status."""

    signal: int | None = None


received = _Received()


def _raise_terminated(signum, frame) -> None:
    received.signal = signal.SIGTERM
    raise Terminated()


def _raise_interrupt(signum, frame) -> None:
    received.signal = signal.SIGINT
    raise KeyboardInterrupt()


@contextmanager
def interrupts_kept():
    """Within: SIGTERM raises `Terminated` and Ctrl-C `KeyboardInterrupt` (noted in `received`)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    received.signal = None
    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, _raise_terminated), (signal.SIGINT, _raise_interrupt))}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_status_for_interrupt() -> int:
    """143 if SIGTERM ended the work, else 130 (Ctrl-C)."""
    return EXIT_TERMINATED if received.signal == signal.SIGTERM else EXIT_INTERRUPTED


def ignore_interrupts() -> None:
    """For worker processes (plots, sweep points): interrupts are the parent's to handle, and the
    parent ends its workers itself, so a signal sent to the whole group leaves no half-done work."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
