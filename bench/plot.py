"""Draws docs/img/<results file>.png for each results file given (default: all of bench/results).

python bench/plot.py [bench/results/FILE.json ...] [--out docs/img]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from energon.bench.plots import plot_results

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    for path in args.files or sorted((ROOT / "bench" / "results").glob("*.json")):
        out = plot_results(path, args.out)
        print(f"{path.name}: {out or 'no point with a ratio or a limit'}")


if __name__ == "__main__":
    main()
