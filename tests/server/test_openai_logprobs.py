"""OpenAI logprobs objects from the Engine's TokenLogprobs, checked against hand-made cases."""

from __future__ import annotations

from energon.sampling import TokenLogprob
from energon.server.openai_logprobs import LogprobsRenderer
from energon.tokenizer import ByteTokenizer

# "hé" as bytes: h = 104, é = 195 169 (one character, two tokens)
H = TokenLogprob(104, -0.25, [(104, -0.25), (105, -2.0), (106, -3.0)])
E1 = TokenLogprob(195, -1.5, [(101, -0.5), (195, -1.5), (97, -4.0)])
E2 = TokenLogprob(169, -0.125, [(169, -0.125), (170, -5.0), (171, -6.0)])


def test_completion_logprobs_are_parallel_lists_with_offsets_running_across_pieces():
    renderer = LogprobsRenderer(ByteTokenizer(), top_n=2, chat=False)
    first = renderer.render([H])
    rest = renderer.render([E1, E2])
    assert first == {
        "tokens": ["h"],
        "token_logprobs": [-0.25],
        "top_logprobs": [{"h": -0.25, "i": -2.0}],
        "text_offset": [0],
    }
    assert rest["tokens"] == ["\ufffd", "\ufffd"]  # half a character each, as vLLM shows it
    assert rest["token_logprobs"] == [-1.5, -0.125]
    assert rest["top_logprobs"][0] == {"e": -0.5, "\ufffd": -1.5}
    assert rest["text_offset"] == [1, 2]
    # two alternatives that both show as U+FFFD: the more likely one's value is kept
    wide = LogprobsRenderer(ByteTokenizer(), top_n=3, chat=False).render([E2])
    assert wide["top_logprobs"] == [{"\ufffd": -0.125}]


def test_chat_logprobs_carry_bytes_and_only_the_asked_alternatives():
    renderer = LogprobsRenderer(ByteTokenizer(), top_n=0, chat=True)
    assert renderer.render([H]) == {
        "content": [{"token": "h", "logprob": -0.25, "bytes": [104], "top_logprobs": []}],
        "refusal": None,
    }
    two = LogprobsRenderer(ByteTokenizer(), top_n=2, chat=True).render([E2])
    (entry,) = two["content"]
    assert [alt["logprob"] for alt in entry["top_logprobs"]] == [-0.125, -5.0]
    assert entry["bytes"] == list("\ufffd".encode())


def test_an_empty_piece_renders_empty_lists():
    assert LogprobsRenderer(ByteTokenizer(), 1, chat=False).render(None)["tokens"] == []
    assert LogprobsRenderer(ByteTokenizer(), 1, chat=True).render([])["content"] == []
