"""Plots of results files: for every measured point, its ratio to the baseline and its fraction
of the physical limit, side by side (bench/plot.py draws them into docs/img)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path


def point_label(record: dict) -> str:
    layout = f"tp={record.get('tp', 1)}" + (
        f" pp={record['pp']}" if record.get("pp", 1) > 1 else ""
    )
    batch = f" b={record['batch']}" if record.get("batch") else ""
    name = textwrap.fill(record["metric"].replace("_", " "), 16)
    return f"{name}\n{layout}{batch}"


POINTS_PER_ROW = 16  # a results file's points drawn in rows of this many, one under another


def rows_of(records: list, per_row: int = POINTS_PER_ROW) -> list[list]:
    """`records` in rows of at most `per_row`, in order (a file collects every run of a day:
    one row of 190 points is too wide to read)."""
    return [records[i : i + per_row] for i in range(0, len(records), per_row)]


def plot_results(path: str | Path, out_dir: str | Path) -> Path | None:
    """Draws `path`'s records that have a ratio or a limit as `out_dir/<stem>.png` (rows of
    POINTS_PER_ROW points); returns the PNG's path, or None when no record has either."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    records = [
        r for r in json.loads(path.read_text()) if r.get("ratio") is not None or r.get("of_limit")
    ]
    if not records:
        return None
    rows = rows_of(records)
    width = 0.38
    fig, axes = plt.subplots(
        len(rows),
        1,
        figsize=(max(6.0, 1.3 * len(rows[0])), 4.6 * len(rows)),
        squeeze=False,
    )
    for ax, row in zip(axes[:, 0], rows, strict=True):
        ratio = [r.get("ratio") or 0.0 for r in row]
        of_limit = [r.get("of_limit") or 0.0 for r in row]
        xs = range(len(row))
        ax.bar(
            [x - width / 2 for x in xs], ratio, width, label="ratio to the baseline (> 1: faster)"
        )
        ax.bar([x + width / 2 for x in xs], of_limit, width, label="fraction of the physical limit")
        ax.axhline(1.0, color="0.3", linewidth=0.8)
        for x, (a, b) in enumerate(zip(ratio, of_limit, strict=True)):
            ax.annotate(f"{a:.2f}", (x - width / 2, a), ha="center", va="bottom", fontsize=7)
            ax.annotate(f"{b:.2f}", (x + width / 2, b), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs), [point_label(r) for r in row], fontsize=7)
        ax.set_xlim(-0.6, len(rows[0]) - 0.4)
    cards = sorted({r.get("card", "?") for r in records})
    axes[0, 0].set_title(f"{path.stem} ({', '.join(cards)})", fontsize=10)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_dir) / f"{path.stem}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
