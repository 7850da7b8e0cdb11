"""The Frontend's Generation: what it reports from the Engine's pieces, with a scripted Engine."""

from __future__ import annotations

from energon.sampling import SamplingParams, StreamPiece, Timings
from energon.server.frontend import Frontend
from energon.tokenizer import ByteTokenizer


class ScriptedEngine:
    """An Engine that answers every request with the same pieces."""

    model = "scripted"
    tokenizer = ByteTokenizer()

    def __init__(self, pieces: list[StreamPiece]):
        self.pieces = pieces

    async def stream(self, ids, params):
        for piece in self.pieces:
            yield piece

    def stats(self) -> dict:
        return {}


async def test_queued_time_is_the_engines_and_token_counts_are_the_doors():
    pieces = [
        StreamPiece("a", [97]),
        StreamPiece("bc", [98, 99], "length", timings=Timings(0.25, 0.5, 0.125)),
    ]
    frontend = Frontend(ScriptedEngine(pieces))
    gen = frontend.generation("xy", SamplingParams(max_tokens=3), door="zmq")
    assert [p.text async for p in gen] == ["a", "bc"]
    assert gen.timings.queued_s == 0.25
    assert 0 < gen.timings.first_token_s  # measured by the door, from its own arrival
    assert (gen.usage.prompt_tokens, gen.usage.completion_tokens) == (2, 3)
    assert gen.finish_reason == "length" and frontend.in_flight == 0
