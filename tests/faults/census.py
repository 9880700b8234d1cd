"""Count the fault cases' outcomes for the code on PYTHONPATH (or `--root` checkout):

    python -m tests.faults.census [--root PATH] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

from .cases import cases
from .runner import OUTCOMES, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=None, help="a checkout whose code to run (default: this one)")
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    counts: Counter = Counter()
    for case in cases():
        if args.only and case.name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as folder:
            outcome, output = run(case, Path(folder), args.root)
        counts[outcome] += 1
        last = output.strip().splitlines()[-1][:110] if output.strip() else ""
        print(f"{case.category:15} {case.name:30} {outcome:15} {last}")
    print(f"{sum(counts.values())} cases: " + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES))


if __name__ == "__main__":
    main()
