"""Text <-> token ids on the controller: tokenizers, streaming detokenization, stop strings.

`load_tokenizer(folder)` reads a Hugging Face checkpoint's tokenizer.json with the `tokenizers`
library, or builds GPT-2's byte-level BPE from vocab.json + merges.txt where a checkpoint (older
GPT-2 and OPT repositories) ships only those; `load_tokenizer(None)` gives the byte-level
tokenizer of the random-weight presets.
`IncrementalDetokenizer` turns generated ids into text pieces as they arrive, and `StopChecker`
finds stop strings in the text and says how much of it may not be streamed yet.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from energon.errors import CheckpointError, InvalidRequest

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """What the Engine needs of a tokenizer.

    `eos_token_ids` holds every id that ends generation (generation_config.json may list
    several); `eos_token_id` is the first of them, or None.
    """

    eos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    chat_template: str | None
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the BOS token first where the model expects one."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens left out; invalid UTF-8 becomes U+FFFD."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """The random-weight presets' tokenizer: ids 0-255 are the UTF-8 bytes of the text,
    256 = <bos>, 257 = <eos>, 258-259 unused (vocab 260). No BOS is added."""

    BOS, EOS = 256, 257

    def __init__(self, vocab_size: int = 260):
        if vocab_size < 258:
            raise ValueError(f"a byte tokenizer needs vocab_size >= 258 (got {vocab_size})")
        self.vocab_size = vocab_size
        self.bos_token_id = self.BOS
        self.eos_token_id = self.EOS
        self.eos_token_ids = (self.EOS,)
        self.chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Raises ValueError for an id outside [0, vocab_size)."""
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


BPE_FILES = ("vocab.json", "merges.txt")  # GPT-2's byte-level BPE without a tokenizer.json
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")


def has_tokenizer(folder: str | Path) -> bool:
    """Whether the folder holds tokenizer.json or vocab.json + merges.txt."""
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in BPE_FILES)


class HFTokenizer(Tokenizer):
    """A checkpoint's tokenizer.json (or vocab.json + merges.txt), read with the `tokenizers`
    library."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        self._tok = _read_rust_tokenizer(folder, config)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self._token_id(config.get("bos_token"))
        self.eos_token_ids = self._eos_ids(folder, config)
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        # add_bos_token (Llama-style configs) overrides what tokenizer.json's post-processor does.
        self._add_bos = config.get("add_bos_token")
        self.chat_template = _chat_template(folder, config)

    def encode(self, text: str) -> list[int]:
        if self._add_bos is False:
            return self._tok.encode(text, add_special_tokens=False).ids
        ids = self._tok.encode(text, add_special_tokens=True).ids
        if self._add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def _token_id(self, token) -> int | None:
        token = _token_text(token)
        return self._tok.token_to_id(token) if token is not None else None

    def _eos_ids(self, folder: Path, config: dict) -> tuple[int, ...]:
        ids = []
        first = self._token_id(config.get("eos_token"))
        if first is not None:
            ids.append(first)
        for name in ("generation_config.json", "config.json"):
            value = _read_json(folder / name).get("eos_token_id")
            for i in value if isinstance(value, list) else [value]:
                if isinstance(i, int) and i not in ids:
                    ids.append(i)
        return tuple(ids)


def _read_rust_tokenizer(folder: Path, config: dict):
    """tokenizer.json, else GPT-2's byte-level BPE from vocab.json + merges.txt with the special
    tokens the configs name. Raises CheckpointError naming the file."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            return RustTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception
            raise CheckpointError(f"{path} cannot be read by `tokenizers`: {e}") from e
    vocab, merges = (folder / f for f in BPE_FILES)
    if not has_tokenizer(folder):
        raise CheckpointError(
            f"{path} is missing: a checkpoint folder needs tokenizer.json "
            f"(or GPT-2's {' + '.join(BPE_FILES)})"
        )
    try:
        tok = RustTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:
        raise CheckpointError(f"{vocab} / {merges} cannot be read by `tokenizers`: {e}") from e
    prefix_space = config.get("add_prefix_space") is True
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    specials = {**_read_json(folder / "special_tokens_map.json"), **config}
    names = [_token_text(specials.get(key)) for key in SPECIAL_TOKEN_KEYS]
    names += [_token_text(t) for t in (config.get("added_tokens_decoder") or {}).values()]
    tok.add_special_tokens([AddedToken(n, special=True) for n in dict.fromkeys(names) if n])
    return tok


def _token_text(token) -> str | None:
    """A special token's text, plain or as a serialised AddedToken ({"content": ...})."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def load_tokenizer(folder: str | Path | None, vocab_size: int = 260) -> Tokenizer:
    """The tokenizer of a checkpoint folder, or the byte tokenizer for a random-weight preset
    (folder None). Raises CheckpointError naming the file when tokenizer.json is missing or bad."""
    if folder is None:
        return ByteTokenizer(vocab_size)
    return HFTokenizer(folder)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    return value if isinstance(value, dict) else {}


def _chat_template(folder: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(
        template, list
    ):  # [{"name": "default", "template": ...}, {"name": "tool_use"...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


class IncrementalDetokenizer:
    """Text of generated tokens, piece by piece, for streaming.

    Decoding token by token is wrong for two reasons: a character may span tokens (byte-level
    BPE, byte fallback), and a token's text may depend on what precedes it (SentencePiece drops
    the leading space of a decode's first word). So, as in TGI and vLLM, each step decodes a
    window: `prefix_offset..read_offset` are tokens already turned into text, kept as context,
    and the new text is what decoding the window plus the new tokens adds to it. A trailing
    U+FFFD (an unfinished character) is held back until a later token completes it or `finish()`.

    `prompt_ids` give the first generated token its context (the last 5 prompt tokens are used);
    pieces hold generated text only.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.tokens: list[int] = list(prompt_ids[-self.CONTEXT_TOKENS :])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self._prefix_len = len(self._decode(self.prefix_offset, self.read_offset))
        self._sent = 0  # chars past the prefix text sent while the window ends unfinished

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Feed one or more new token ids; returns the text they complete ('' if none yet)."""
        if isinstance(token_ids, int):
            self.tokens.append(token_ids)
        else:
            self.tokens.extend(token_ids)
        text = self._decode(self.prefix_offset, len(self.tokens))
        end = len(text)
        while end > self._prefix_len and text[end - 1] == REPLACEMENT_CHAR:
            end -= 1
        start = self._prefix_len + self._sent
        piece = text[start:end] if end > start else ""
        if end == len(text) and end > self._prefix_len:
            # The window ends on a finished character: its text is final, move the window on.
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            self._prefix_len = len(self._decode(self.prefix_offset, self.read_offset))
            self._sent = 0
        else:
            self._sent += len(piece)
        return piece

    def finish(self) -> str:
        """Whatever is still held back (an unfinished character renders as U+FFFD)."""
        text = self._decode(self.prefix_offset, len(self.tokens))
        piece = text[self._prefix_len + self._sent :]
        self._sent += len(piece)
        return piece

    def _decode(self, start: int, stop: int) -> str:
        return self.tokenizer.decode(self.tokens[start:stop]) if stop > start else ""


@dataclass(frozen=True)
class StopCheck:
    """`stopped`: a stop string occurred; `text`: the text to keep (cut before the first stop
    string when stopped, or after it when the checker includes it); `safe_len`: how many chars
    of `text` may be streamed now, the rest possibly being the start of a stop string
    (== len(text) when stopped)."""

    stopped: bool
    text: str
    safe_len: int


class StopChecker:
    """Finds the earliest occurrence of any stop string in the generated text; `include` keeps
    that stop string in the text (the longest of those starting there)."""

    def __init__(self, stop: Sequence[str], include: bool = False):
        self.stop = tuple(s for s in stop if s)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.include = include

    def check(self, text: str, checked_len: int = 0) -> StopCheck:
        """Check `text`, all generated text so far. `checked_len` is the length of the text at
        the previous check (already searched), so only the new tail and the stop-string-long
        overlap before it are searched."""
        if not self.stop:
            return StopCheck(False, text, len(text))
        start = max(0, checked_len - self.longest + 1)
        hits = [(i, len(s)) for i, s in ((text.find(s, start), s) for s in self.stop) if i >= 0]
        if hits:
            cut, length = min(hits, key=lambda hit: (hit[0], -hit[1]))
            if self.include:
                cut += length
            return StopCheck(True, text[:cut], cut)
        return StopCheck(False, text, self.safe_len(text))

    def safe_len(self, text: str) -> int:
        """How many chars of `text` may be streamed, stop strings in it or not: all but an end
        that could start one."""
        return len(text) - self._partial_suffix(text) if self.stop else len(text)

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper start of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


def require_unicode(text: str, field: str = "prompt") -> str:
    """Returns `text`, or raises InvalidRequest (naming `field`) for text no tokenizer can take:
    a lone surrogate ("\\ud800"), which JSON and Python strings can hold but UTF-8 cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            field, f"is not valid Unicode: {exc.reason} at character {exc.start}"
        ) from None
    return text
