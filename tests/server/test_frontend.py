"""The Frontend's Generation: what it reports from the Engine's pieces, with a scripted Engine."""

from __future__ import annotations

from energon.sampling import SamplingParams, StreamPiece, Timings
from energon.scheduler import Scheduler
from energon.server.frontend import Frontend, Limits
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


def test_filling_the_context_leaves_room_for_the_prompt_within_the_limit():
    engine = ScriptedEngine([])
    frontend = Frontend(engine, limits=Limits(max_tokens=100))
    params = SamplingParams(max_tokens=100)

    def filled(prompt: str, max_model_len: int | None, capacity: int = 1000) -> int:
        engine.scheduler = Scheduler(capacity // 4, 4, max_model_len=max_model_len)
        return frontend.generation(prompt, params, "http", fill_context=True).params.max_tokens

    assert filled("abc", max_model_len=10) == 7  # 3 prompt tokens (bytes) + 7 = 10
    assert filled("abc", max_model_len=None, capacity=20) == 18  # the last token is not cached
    assert filled("abc", max_model_len=4096) == 100  # the server's limit
    assert filled("abcdefghijk", max_model_len=10) == 1  # the Engine refuses the prompt itself
    assert frontend.generation("abc", params, "http").params.max_tokens == 100  # not filling
