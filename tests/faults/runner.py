"""Runs one fault case in a fresh process of the `pensieve` command and says how it came out."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .cases import Case

OUTCOMES = ("clear error", "as intended", "traceback", "silently wrong", "data lost", "unclear message")
COMMAND = "import sys; from pensieve.cli import main; sys.exit(main())"


def lay_out(case: Case, folder: Path) -> None:
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(yaml.safe_dump(content))


def run(case: Case, folder: Path, pythonpath: str | None = None, timeout_s: float = 120) -> tuple[str, str]:
    """(outcome, what it printed) of one case, laid out and run in `folder`."""
    lay_out(case, folder)
    argv = [sys.executable, "-c", COMMAND, *(a.replace("{tmp}", str(folder)) for a in case.argv)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pythonpath, str(folder)) if p))
    process = subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, preexec_fn=_limits(case))
    if case.signal:
        time.sleep(case.after_s)
        sig = getattr(signal, case.signal)
        if case.group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return "data lost" if case.expect == "kept" else "unclear message", output + "\n[timed out]"
    left = _children_left(process.pid)
    return _judge(case, folder, process.returncode, output, left), output


def _limits(case: Case):
    """A file-size limit standing in for a full disk: writes past it fail with EFBIG (SIGXFSZ ignored)."""
    if case.file_bytes is None:
        return None

    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (case.file_bytes, case.file_bytes))
    return apply


def _children_left(group: int) -> bool:
    time.sleep(0.2)
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    os.killpg(group, signal.SIGKILL)
    return True


def _judge(case: Case, folder: Path, code: int, output: str, left: bool) -> str:
    traceback = "Traceback (most recent call last)" in output
    needles = all(n in output for n in case.needles)

    def check() -> bool:
        if case.check is None:
            return True
        try:
            case.check(folder, output)
        except (AssertionError, OSError, ValueError, KeyError):
            return False
        return True

    if case.expect == "kept":
        if code != 0 and check() and not left and not traceback:
            return "as intended"
        return "data lost"
    if traceback:
        return "traceback"
    if case.expect == "error":
        if code == 0:
            return "silently wrong"
        if not check():
            return "data lost"
        return "clear error" if needles else "unclear message"
    if code == 0 and needles and check():
        return "as intended"
    return "silently wrong" if code == 0 else "unclear message"
