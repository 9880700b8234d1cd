"""Results folders and files: checked before the work starts, written whole or not at all.

- `prepare_folder` refuses, before any simulation, an `--out` that is a file, a folder that
  cannot be written, or one that already holds this tool's results (unless `force`, which
  removes only the files this tool writes there);
- `atomic_path` gives a temporary name beside the target and renames it into place once the
  file is complete, so a full disk or an interruption never leaves a file cut mid-row.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

# Every file a run, a sweep or a validation writes in its results folder.
RESULT_FILES = (
    "summary.json", "requests.csv", "scenario.yaml", "timeline.csv", "outputs.jsonl", "steps.jsonl",
    "sweep.csv", "summaries.json", "throughput_at_target.json", "validation.json",
    "hit_rates.png", "occupancy.png", "ttft_by_turn.png", "latency_vs_throughput.png", "hit_rates_by_policy.png",
    "validation_errors.png", "step_time_replay.png",
)


class OutputError(ValueError):
    """A results path that cannot be used; the message names it and says what to do."""


def prepare_folder(folder: str | Path, force: bool = False, option: str = "--out",
                   inputs: tuple[str | Path, ...] = ()) -> Path:
    """The results folder, created and checked writable; refuses to mix with an earlier run's results,
    and to hold one of the command's `inputs` under a name a result would replace."""
    folder = Path(folder)
    for given in inputs:
        path = Path(given)
        if path.name in RESULT_FILES and path.resolve().parent == folder.resolve():
            raise OutputError(f"{option} {folder}: holds {path.name}, the command's own input, which the "
                              "results would replace; choose another folder")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{option} {folder}: is a file, not a folder; give a folder for the results")
    existing = [name for name in RESULT_FILES if (folder / name).exists()]
    existing += [f"{p.parent.name}/summary.json" for p in folder.glob("*/summary.json")] if folder.is_dir() else []
    if existing and not force:
        raise OutputError(f"{option} {folder}: already holds results ({', '.join(sorted(existing)[:4])}"
                          f"{', ...' if len(existing) > 4 else ''}); pass --force to replace them, or choose "
                          "another folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputError(f"{option} {folder}: cannot write there ({exc.strerror})") from None
    if force:
        for name in RESULT_FILES:
            (folder / name).unlink(missing_ok=True)
    return folder


def check_new_file(path: str | Path, force: bool = False, option: str = "--out") -> Path:
    """A file to write: its folder must be writable, and an existing file is kept unless `force`."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a folder; give a file name")
    if path.exists() and not force:
        raise OutputError(f"{option} {path}: already exists; pass --force to replace it, or choose another name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{option} {path}: cannot write in {parent}")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: str | Path):
    """Yield a temporary path beside `target`; on success rename it to `target`, else remove it."""
    target = Path(target)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part" + target.suffix)
    os.close(fd)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it owner-only; results are as readable as any file
    try:
        yield Path(temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(target: str | Path, mode: str = "w", **kwargs):
    """`open` a temporary file beside `target`, renamed into place when closed without an error."""
    with atomic_path(target) as temporary:
        with open(temporary, mode, **kwargs) as handle:
            yield handle
