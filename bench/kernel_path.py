"""Prints what a profiled step waited for, kernel by kernel (energon/bench/kernel_path.py).

python bench/kernel_path.py DIR/tp2-auto-lookaheadTrue-decode1-rank0.json [...]
(the chrome traces of `energon bench generate --profile --profile-dir DIR`)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from energon.bench.kernel_path import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--width", type=int, default=60, help="characters of a kernel's name")
    args = parser.parse_args()
    for path in args.traces:
        print(report(path, args.width))


if __name__ == "__main__":
    main()
