"""Benchmark records as BENCHMARKS.md defines them, and the results file they go into."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"


def card_name() -> str:
    """The accelerator's name (torch.cuda.get_device_name) or the CPU model on a CPU-only host."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_sha() -> str:
    """The current commit: ENERGON_GIT_SHA when set (a copy of a working tree whose .git is
    another commit's, as on a lent GPU machine), else git's HEAD, or "unknown" outside a
    checkout."""
    if sha := os.environ.get("ENERGON_GIT_SHA"):
        return sha
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def torch_version() -> str:
    try:
        import torch

        nccl = ""
        if torch.cuda.is_available():
            nccl = " nccl " + ".".join(map(str, torch.cuda.nccl.version()))
        return torch.__version__ + nccl
    except ImportError:
        return "none"


@dataclass
class Record:
    """One measured point; `ratio` > 1 means Energon beats the baseline."""

    scenario: str
    metric: str
    unit: str
    value: float
    model: str | None = None
    dtype: str | None = None
    tp: int = 1
    pp: int = 1
    batch: int | None = None
    prompt_len: int | None = None
    gen_len: int | None = None
    baseline_name: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    limit_value: float | None = None
    of_limit: float | None = None
    card: str = field(default_factory=card_name)
    n_gpus: int = 0
    torch: str = field(default_factory=torch_version)
    git_sha: str = field(default_factory=git_sha)
    notes: str | None = None


def copy_bandwidth_record(scenario: str, bytes_per_s: float, n_gpus: int, **fields) -> Record:
    """The record of a device-to-device copy bandwidth measured in the same run (the floor of a
    memory-bound scenario)."""
    return Record(
        scenario=scenario,
        metric="copy_bandwidth",
        unit="GB/s",
        value=bytes_per_s / 1e9,
        n_gpus=n_gpus,
        notes="device-to-device, bytes read + written, measured in the same run",
        **fields,
    )


def results_path(scenario: str, card: str | None = None, day: datetime.date | None = None) -> Path:
    """bench/results/<YYYY-MM-DD>-<card>-<scenario>.json with the card name made file-safe."""
    day = day or datetime.date.today()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", card or card_name()).strip("-").lower()
    return RESULTS_DIR / f"{day.isoformat()}-{slug}-{scenario}.json"


POINT_FIELDS = ("metric", "model", "dtype", "tp", "pp", "batch", "prompt_len", "gen_len", "card")


def point(record: dict) -> tuple:
    """What a record measured, whatever it found: two records of one point replace each other."""
    return tuple(record.get(name) for name in POINT_FIELDS)


def write_results(scenario: str, records: list[Record], out_dir: Path | None = None) -> Path:
    """Writes the records as a JSON list and returns the file's path. A file of that name from
    an earlier run of the day keeps its records of other points (another model, tp, batch...)
    after the new ones: two runs into one folder (say opt-13b, then llama-2-13b) lose nothing,
    and a point measured again holds the newer record only."""
    path = results_path(scenario, records[0].card if records else None)
    if out_dir is not None:
        path = Path(out_dir) / path.name
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in records]
    new = {point(row) for row in rows}
    earlier = json.loads(path.read_text()) if path.exists() else []
    rows += [row for row in earlier if point(row) not in new]
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path


def print_records(records: list[Record], lead: str | None = None) -> None:
    """The records as a console table, one line each: the `lead` field when given (e.g. "tp"),
    metric, value, unit, baseline value, ratio, limit and of_limit ("-" where a record has none)."""

    def num(x, spec=".4g") -> str:
        return f"{x:{spec}}" if isinstance(x, (int, float)) else "-"

    head = f"{lead:>9} " if lead else ""
    print(
        f"\n{head}{'metric':<40} {'value':>10} {'unit':<9} {'baseline':>10} {'ratio':>7} "
        f"{'limit':>10} {'of_limit':>8}"
    )
    for r in records:
        first = ""
        if lead:
            value = getattr(r, lead)
            first = f"{'-' if value is None else str(value):>9} "
        print(
            f"{first}{r.metric:<40} {num(r.value):>10} {r.unit:<9} {num(r.baseline_value):>10} "
            f"{num(r.ratio, '.3f'):>7} {num(r.limit_value):>10} {num(r.of_limit, '.3f'):>8}"
        )
