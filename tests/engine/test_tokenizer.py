"""Tokenizers, streaming detokenization and stop strings."""

import json

import pytest
from engine_helpers import train_bpe
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers

from energon.errors import CheckpointError
from energon.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    IncrementalDetokenizer,
    StopChecker,
    load_tokenizer,
)

TEXT = "the cat sat: naïve €5 日本 😀!"
CORPUS = ["the cat sat on the mat", "the dog sat on the log", "naive cats and dogs"] * 20
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """A byte-level BPE trained on a tiny English corpus, saved as a checkpoint's tokenizer."""
    tok = train_bpe(vocab_multiple=1, corpus=CORPUS)
    folder = tmp_path_factory.mktemp("bpe")
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<s>", "special": True},
        "eos_token": "</s>",
        "add_bos_token": True,
        "chat_template": TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    return folder


@pytest.fixture(scope="module")
def bpe(bpe_folder):
    return load_tokenizer(bpe_folder)


def stream(tokenizer, ids, prompt_ids=()):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    return [detok.add(i) for i in ids] + [detok.finish()]


# Byte tokenizer (the `tiny` preset)


def test_byte_tokenizer_ids_are_utf8_bytes():
    assert load_tokenizer(None).encode("é€") == list("é€".encode())


def test_byte_tokenizer_round_trips_multibyte_text():
    tok = load_tokenizer(None)
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_byte_tokenizer_specials_and_vocab():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (256, 257, 260)
    assert tok.chat_template is None


def test_byte_tokenizer_decode_skips_specials_and_replaces_invalid_utf8():
    assert load_tokenizer(None).decode([256, 104, 0xE2, 0x82, 105, 257, 259]) == "h\ufffdi"


def test_byte_tokenizer_decode_refuses_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="260"):
        load_tokenizer(None).decode([104, 260])


# Checkpoint tokenizer (`tokenizers` library)


def test_checkpoint_tokenizer_matches_the_tokenizers_library(bpe, bpe_folder):
    reference = RustTokenizer.from_file(str(bpe_folder / "tokenizer.json"))
    assert isinstance(bpe, HFTokenizer)
    assert bpe.encode(TEXT) == [0] + reference.encode(TEXT).ids  # add_bos_token puts <s> first
    assert bpe.decode(bpe.encode(TEXT)) == TEXT


def test_checkpoint_tokenizer_reads_specials_and_chat_template(bpe, bpe_folder):
    reference = RustTokenizer.from_file(str(bpe_folder / "tokenizer.json"))
    assert (bpe.bos_token_id, bpe.eos_token_id) == (0, 1)
    assert bpe.eos_token_ids == (1, 7)  # tokenizer_config first, then generation_config's
    assert bpe.chat_template == TEMPLATE
    assert bpe.vocab_size == len(reference.get_vocab()) > 256


def test_checkpoint_without_tokenizer_json_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("opt_style", [False, True])
def test_vocab_and_merges_alone_encode_and_decode_as_transformers_gpt2_tokenizer(
    tmp_path, opt_style
):
    """GPT-2 / OPT repositories without tokenizer.json: the slow (pure Python) GPT2Tokenizer of
    transformers, reading the same two files, is the reference. OPT puts </s> first."""
    from transformers import GPT2Tokenizer

    trained = train_bpe(vocab_multiple=1, corpus=CORPUS)
    trained.model.save(str(tmp_path))  # vocab.json + merges.txt
    specials = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<s>"}
    config = {**specials, "add_bos_token": opt_style}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(tmp_path)
    ref = GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), **config)
    for text in (TEXT, "the cat</s> sat", " leading space", "a\n\nb  c"):
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, (1,))
    assert ours.vocab_size == len(ref)


def test_checkpoint_with_broken_tokenizer_config_is_a_checkpoint_error(bpe_folder, tmp_path):
    (tmp_path / "tokenizer.json").write_text((bpe_folder / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


# Incremental detokenization


def test_bpe_splits_multibyte_characters_across_tokens(bpe):
    """Precondition of the streaming tests: some single tokens are partial characters."""
    assert any("\ufffd" in bpe.decode([i]) for i in bpe.encode(TEXT))


def test_streamed_pieces_join_to_the_full_decode(bpe):
    ids = bpe.encode(TEXT)[1:]
    assert "".join(stream(bpe, ids)) == bpe.decode(ids) == TEXT


def test_streamed_pieces_never_hold_a_partial_character(bpe):
    pieces = stream(bpe, bpe.encode(TEXT)[1:])
    assert not any("\ufffd" in piece for piece in pieces)
    assert "€" in pieces  # emitted whole, on the token that completes it


def test_byte_tokenizer_streams_a_split_character_whole():
    tok = load_tokenizer(None)
    assert stream(tok, tok.encode("a€b")) == ["a", "", "", "€", "b", ""]


def test_unfinished_character_is_released_by_finish():
    tok = load_tokenizer(None)
    assert stream(tok, [104, 0xE2, 0x82]) == ["h", "", "", "\ufffd"]


def test_invalid_bytes_are_streamed_once_followed_by_text():
    tok = load_tokenizer(None)
    assert stream(tok, [0x80, 104]) == ["", "\ufffdh", ""]


def test_text_before_an_unfinished_character_is_not_held_back():
    tok = load_tokenizer(None)
    detok = IncrementalDetokenizer(tok)
    assert detok.add([104, 105, 0xE2]) == "hi"
    assert detok.add(0x82) == ""
    assert detok.add(0xAC) == "€"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 259), max_size=40))
def test_any_byte_stream_joins_to_the_full_decode(ids):
    tok = load_tokenizer(None)
    assert "".join(stream(tok, ids)) == tok.decode(ids)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_bpe_id_stream_joins_to_the_full_decode(bpe, data):
    ids = data.draw(st.lists(st.integers(0, bpe.vocab_size - 1), max_size=30))
    assert "".join(stream(bpe, ids)) == bpe.decode(ids)


def metaspace_tokenizer():
    """A SentencePiece-style tokenizer: decoding a word alone drops its leading space."""
    vocab = {"▁Hello": 0, "▁world": 1, "!": 2}
    tok = RustTokenizer(models.WordLevel(vocab, unk_token="!"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return tok


def test_window_keeps_spaces_that_a_suffix_decode_drops(tmp_path):
    metaspace_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.decode([1]) == "world"  # the reason a window is needed
    assert "".join(stream(tok, [0, 1, 2])) == tok.decode([0, 1, 2]) == "Hello world!"
    assert stream(tok, [1, 2], prompt_ids=[0]) == [" world", "!", ""]


# Stop strings


def test_stop_string_cuts_text_before_it():
    check = StopChecker(["\n\n", "END"]).check("one\n\ntwo END")
    assert (check.stopped, check.text, check.safe_len) == (True, "one", 3)


def test_stop_string_kept_when_included_the_longest_of_those_starting_there():
    check = StopChecker(["END", "\n\n", "ENDS"], include=True).check("one\n\ntwo ENDS")
    assert (check.stopped, check.text, check.safe_len) == (True, "one\n\n", 5)
    longest = StopChecker(["END", "ENDS"], include=True).check("two ENDS more")
    assert (longest.text, longest.safe_len) == ("two ENDS", 8)


def test_earliest_stop_string_wins():
    assert StopChecker(["END", "two"]).check("one two END").text == "one "


def test_possible_start_of_a_stop_string_is_held_back():
    check = StopChecker(["STOP", "xy"]).check("hello ST")
    assert (check.stopped, check.safe_len) == (False, len("hello "))


def test_stop_string_across_pieces_is_found_from_the_previous_length():
    checker = StopChecker(["STOP"])
    first = checker.check("ab ST")
    assert first.safe_len == 3
    second = checker.check("ab STOP and more", checked_len=len("ab ST"))
    assert (second.stopped, second.text) == (True, "ab ")


def test_no_stop_strings_streams_everything():
    check = StopChecker([]).check("anything")
    assert (check.stopped, check.safe_len) == (False, 8)
