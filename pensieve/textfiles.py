"""Reading the text files a user gives (scenarios, traces, ShareGPT files, profiles) as UTF-8."""
from __future__ import annotations

from pathlib import Path


class NotUtf8(ValueError):
    """A file that is not UTF-8 text; the message gives the first bad byte and its position."""


def read_utf8(path: str | Path) -> str:
    """The file's text; OSError if it cannot be read, NotUtf8 if it is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotUtf8(f"is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r})") from None
