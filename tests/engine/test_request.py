"""A request's controller-side state (energon/request.py): what its reader is woken with."""

from __future__ import annotations

from energon.request import Request
from energon.sampling import SamplingParams
from energon.tokenizer import ByteTokenizer


def drain(req: Request) -> list:
    pieces = []
    while not req.pieces.empty():
        pieces.append(req.pieces.get_nowait())
    return pieces


def fed(stream: bool, text: str = "héllo", **params) -> Request:
    tok = ByteTokenizer()
    req = Request(0, tok.encode("a"), SamplingParams(max_tokens=32, **params), tok, stream)
    ids = tok.encode(text)
    for i, token in enumerate(ids):
        done = req.on_token(token)
        assert done == (i == len(ids) - 1 and "stop" in params)
    return req


def test_a_stream_gets_a_piece_per_token_with_text_and_an_infer_call_one_at_the_end():
    streamed = fed(True, stop=["lo"])
    pieces = drain(streamed)
    assert len(pieces) > 3  # "é" is two bytes: one piece waits for the second
    assert "".join(p.text for p in pieces) == "hél"
    assert [i for p in pieces for i in p.token_ids] == streamed.token_ids
    assert [p.finish_reason for p in pieces[-1:]] == ["stop"]

    whole = fed(False, stop=["lo"])
    (piece,) = drain(whole)  # the reader wakes once
    assert (piece.text, piece.token_ids, piece.finish_reason) == ("hél", whole.token_ids, "stop")
    assert whole.completion().text == streamed.completion().text == "hél"


def test_an_infer_call_still_ends_at_max_tokens_and_at_a_stop_token():
    tok = ByteTokenizer()
    by_length = Request(0, [97], SamplingParams(max_tokens=3), tok, stream=False)
    assert [by_length.on_token(t) for t in (98, 99, 100)] == [False, False, True]
    (piece,) = drain(by_length)
    assert (piece.text, piece.finish_reason) == ("bcd", "length")
    by_eos = Request(1, [97], SamplingParams(max_tokens=9), tok, stream=False)
    assert [by_eos.on_token(t) for t in (98, ByteTokenizer.EOS)] == [False, True]
    (piece,) = drain(by_eos)
    assert (piece.text, piece.token_ids, piece.finish_reason) == ("b", [98, 257], "stop")


class CountingTokenizer(ByteTokenizer):
    def __init__(self):
        super().__init__()
        self.decodes = 0

    def decode(self, ids, *args, **kwargs):
        self.decodes += 1
        return super().decode(ids, *args, **kwargs)


def test_an_infer_call_without_stop_strings_decodes_once_at_the_end_to_the_streamed_text():
    texts = {}
    for stream in (True, False):
        tok = CountingTokenizer()
        req = Request(0, tok.encode("a"), SamplingParams(max_tokens=7), tok, stream)
        before = tok.decodes
        ids = tok.encode("héllo") + [0xC3]  # ends on half a character
        assert [req.on_token(t) for t in ids] == [False] * 6 + [True]
        texts[stream] = (req.completion().text, tok.decodes - before)
    assert texts[True][0] == texts[False][0] == "héllo\ufffd"
    assert texts[True][1] > 7 and texts[False][1] <= 3  # per token, against once (+ its context)


def test_an_aborted_infer_call_keeps_the_text_of_the_tokens_it_got():
    tok = ByteTokenizer()
    for stream in (True, False):
        req = Request(0, [97], SamplingParams(max_tokens=9), tok, stream)
        assert [req.on_token(t) for t in tok.encode("hé")] == [False, False, False]
        req.abort()
        assert (req.completion().text, req.finish_reason) == ("hé", "abort")


def test_only_the_last_piece_carries_the_timings_of_the_completion():
    tok = ByteTokenizer()
    req = Request(0, [97], SamplingParams(max_tokens=3), tok, stream=True)
    req.on_scheduled()
    for token in (98, 99, 100):
        req.on_token(token)
    pieces = drain(req)
    assert [p.timings for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    last = pieces[-1].timings
    assert last == req.completion().timings
    assert 0 <= last.queued_s <= last.first_token_s and last.per_output_token_s > 0


def test_min_tokens_lets_no_stop_end_the_request_before_it_and_bans_the_stop_ids():
    tok = ByteTokenizer()
    params = SamplingParams(max_tokens=9, min_tokens=3, stop=["b"], stop_token_ids=[120])
    req = Request(0, [97], params, tok, stream=True)
    assert req.wire_params["min_tokens"] == 3
    assert req.wire_params["banned"] == sorted({120, *tok.eos_token_ids})
    # "b" as the 1st token: not a stop yet; "xb" ends at the 3rd token's text, which counts
    assert [req.on_token(t) for t in b"bxb"] == [False, False, True]
    assert req.completion().text == "bx" and req.finish_reason == "stop"
    # a stop id that came (had the sampler not banned it) as the 1st token does not stop it
    late = Request(1, [97], SamplingParams(max_tokens=9, min_tokens=1), tok, stream=False)
    assert not late.ends_with(ByteTokenizer.EOS)
    assert late.on_token(ByteTokenizer.EOS) is False
    assert late.ends_with(ByteTokenizer.EOS) and late.on_token(ByteTokenizer.EOS) is True
    assert late.finish_reason == "stop" and len(late.token_ids) == 2


def test_without_min_tokens_or_stop_ids_the_wire_params_are_the_sampling_params():
    tok = ByteTokenizer()
    plain = Request(0, [97], SamplingParams(min_tokens=0), tok).wire_params
    assert plain == SamplingParams().to_wire()
    nothing_to_ban = Request(1, [97], SamplingParams(min_tokens=2, ignore_eos=True), tok)
    assert "banned" not in nothing_to_ban.wire_params
