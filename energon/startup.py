"""What the Engine shows and picks while it starts: progress of each phase, and the tokenizer.

Start-up has three phases: spawning the worker processes, loading each rank's shards (ranks load in
parallel; each reports when it is done) and sizing the KV cache. `StartupProgress` shows them on
stderr as a bar redrawn in place when stderr is a terminal, and as log lines of the "energon"
logger otherwise (a log file, a server, CI).

`engine_tokenizer(spec)` is the checkpoint's tokenizer (tokenizer.json, or vocab.json +
merges.txt), the byte tokenizer of a preset, or, for a checkpoint folder with neither,
`TokenIdsOnly`: prompts must then be token ids, and completions carry token ids with empty text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from energon.errors import InvalidRequest
from energon.tokenizer import Tokenizer, has_tokenizer, load_tokenizer

log = logging.getLogger("energon")

BAR_WIDTH = 24
REDRAW_S = 0.25  # how often the bar's clock is redrawn on a terminal


class StartupProgress:
    """Progress of the start-up phases. `total` counts every unit of work (a rank spawned, a
    rank loaded, the cache sized); `phase(name)` starts a phase, `advance(detail)` completes one
    unit, `finish(summary)` ends the display. `bar` None picks: a bar if `stream` is a terminal
    (then nothing is logged), else log lines. `start`: the perf_counter() time start-up began."""

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        bar: bool | None = None,
        start: float | None = None,
    ):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.bar = bool(isatty and isatty()) if bar is None else bar
        self.done = 0
        self.name = ""
        self.start = time.perf_counter() if start is None else start  # a perf_counter() time
        self._detail = ""
        self._timer: asyncio.TimerHandle | None = None

    def phase(self, name: str, message: str) -> None:
        """Start a phase: `name` labels the bar, `message` is the log line."""
        self.name = name
        if self.bar:
            self._draw()
        else:
            log.info("energon: %s", message)

    def advance(self, detail: str = "", units: int = 1) -> None:
        """`units` more units are done; `detail` says what (a log line, or the bar's tail)."""
        self.done = min(self.total, self.done + units)
        if self.bar:
            self._draw(detail)
        elif detail:
            log.info("energon: %s", detail)

    def finish(self, summary: str) -> None:
        """End the display: the bar's line is replaced by `summary`, or `summary` is logged."""
        self._stop_clock()
        if self.bar:
            self.stream.write(f"\r\x1b[2Kenergon: {summary}\n")
            self.stream.flush()
        else:
            log.info("energon: %s", summary)

    def fail(self) -> None:
        """Stop drawing after an error; the bar's line is left as it was, ended."""
        self._stop_clock()
        if self.bar:
            self.stream.write("\n")
            self.stream.flush()

    def render(self, detail: str = "") -> str:
        """The bar's line: [#####-----] done/total phase detail elapsed."""
        filled = BAR_WIDTH * self.done // max(1, self.total)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        elapsed = time.perf_counter() - self.start
        tail = f": {detail}" if detail else ""
        return f"energon [{bar}] {self.done}/{self.total} {self.name}{tail} {elapsed:.1f}s"

    def _draw(self, detail: str = "") -> None:
        width = shutil.get_terminal_size().columns - 1  # a wrapped line could not be redrawn
        self.stream.write("\r\x1b[2K" + self.render(detail)[:width])
        self.stream.flush()
        self._detail = detail
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(REDRAW_S, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._draw(self._detail)  # the clock moves while a phase waits on the workers

    def _stop_clock(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class TokenIdsOnly(Tokenizer):
    """Stands in for a checkpoint folder without tokenizer.json: `encode` raises InvalidRequest
    (pass token ids instead), `decode` gives ''. EOS ids come from generation_config.json and
    config.json, so generation still stops where Hugging Face's `generate` would."""

    def __init__(self, folder: Path, vocab_size: int):
        self.folder = folder
        self.vocab_size = vocab_size
        ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            value = _read_json(folder / name).get("eos_token_id")
            for i in value if isinstance(value, list) else [value]:
                if isinstance(i, int) and 0 <= i < vocab_size and i not in ids:
                    ids.append(i)
        self.eos_token_ids = tuple(ids)
        self.eos_token_id = ids[0] if ids else None
        bos = _read_json(folder / "config.json").get("bos_token_id")
        self.bos_token_id = bos if isinstance(bos, int) else None
        self.chat_template = None

    def encode(self, text: str) -> list[int]:
        raise InvalidRequest(
            "prompt",
            f"must be a list of token ids: {self.folder} has no tokenizer.json to encode text",
        )

    def decode(self, ids: Sequence[int]) -> str:
        return ""


def engine_tokenizer(folder: Path | None, vocab_size: int) -> Tokenizer:
    """The tokenizer the Engine uses for `folder` (None: a preset); see the module docstring.
    Raises CheckpointError when tokenizer.json exists but cannot be read."""
    if folder is not None and not has_tokenizer(folder):
        log.warning(
            "energon: %s has no tokenizer.json (nor vocab.json + merges.txt); prompts must be "
            "token ids and completions carry token ids only (empty text)",
            folder,
        )
        return TokenIdsOnly(Path(folder), vocab_size)
    return load_tokenizer(folder, vocab_size)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
