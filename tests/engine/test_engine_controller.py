"""The Engine's controller logic against stand-in workers, with no process: the test decides
when (and in which order) each step's reply comes back, and what it says.

The stand-in "model" continues every sequence with (last token fed) + 1, so each request's
expected output is known exactly, and is only produced if every step feeds each sequence its own
last token. Like real workers, it runs steps in the order they arrive (at pp=1 the Engine chains
decode steps: a chained row's token is the one an earlier step sampled, fed on the worker).
"""

from __future__ import annotations

import asyncio

import pytest

import energon.engine
from energon import EnergonError, Engine, InvalidRequest, RemoteError, SamplingParams

pytestmark = pytest.mark.timeout(30)

VOCAB = 260  # the `tiny` preset's


class Handle:
    def __init__(self, group, rank):
        self.group, self.rank = group, rank

    def call(self, method, *args):
        assert method == "load"
        fut = self.group.loop.create_future()
        fut.set_result(
            {"rank": self.rank, "layers": [0, 4], "tensors": 1, "bytes": 0, "seconds": 0}
        )
        return fut


class StandInWorkers:
    """Answers start-up calls at once; holds every sample_step until the test replies to it."""

    refuse_kv: str | None = None  # what kv_blocks_fit raises (a ValueError on the worker)

    def __init__(self, world_size: int):
        self.loop = asyncio.get_running_loop()
        self.world_size = world_size
        # (step message, its future, the tokens it samples), in arrival order
        self.pending: list[tuple[dict, asyncio.Future, list[int]]] = []
        self.sampled: dict[int, list[int]] = {}  # step_id -> its tokens (what chains read)
        self.sent: list[dict] = []  # every step message, in order

    def __getitem__(self, rank):
        return Handle(self, rank)

    def broadcast(self, method, *args):
        fut = self.loop.create_future()
        if method == "kv_blocks_fit" and self.refuse_kv is not None:
            fut.set_exception(RemoteError("ValueError", self.refuse_kv, rank=0))
        elif method == "kv_blocks_fit":
            fut.set_result([64] * self.world_size)
        elif method == "init_kv_cache":
            fut.set_result([None] * self.world_size)
        else:
            assert method == "sample_step"
            self.sent.append(args[0])
            self.pending.append((args[0], fut, self._run(args[0])))
        return fut

    def _run(self, msg: dict) -> list[int]:
        """The tokens a step samples: next = last token fed + 1, a chained row's token being
        the one the step it chains sampled for it."""
        ids, start, tokens = msg["input_ids"].tolist(), 0, []
        if "chain_from" in msg:
            fed = self.sampled[msg["chain_from"]]
            for at, row in zip(msg["chain_tokens"], msg["chain_rows"], strict=True):
                ids[at] = fed[row]
        for n, sample in zip(msg["query_lens"], msg["sample"], strict=True):
            last = ids[start + n - 1]
            if sample:
                tokens.append((last + 1) % VOCAB)
            start += n
        self.sampled[msg["step_id"]] = tokens
        return tokens

    def add_failure_callback(self, callback):
        pass

    async def wait_failed(self):
        """No stand-in worker dies: a failed step's wait for a dead peer runs out."""
        await asyncio.Event().wait()

    async def shutdown(self):
        for _, fut, _ in self.pending:
            fut.cancel()

    def reply(self, index: int) -> None:
        """Answer pending step `index` (0 = oldest) as the last stage would: next = last + 1."""
        msg, fut, tokens = self.pending.pop(index)
        replies = [None] * self.world_size
        replies[-1 if self.world_size > 1 else 0] = {
            "step_id": msg["step_id"],
            "token_ids": tokens,
            "logprobs": None,
        }
        fut.set_result(replies)

    def fail(self, index: int, error: BaseException) -> None:
        _, fut, _ = self.pending.pop(index)
        fut.set_exception(error)


@pytest.fixture
def stand_in(monkeypatch):
    """Makes Engine.start build StandInWorkers instead of spawning processes."""
    made = []

    class Actors:
        @staticmethod
        async def spawn(target, world_size, **kwargs):
            made.append(StandInWorkers(world_size))
            return made[0]

    monkeypatch.setattr(energon.engine, "ActorGroup", Actors)
    return made


async def next_turn() -> None:
    """Lets tasks just created submit, then the loop's next turn send their steps."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def expected(prompt: list[int], n: int) -> list[int]:
    return [(prompt[-1] + i) % VOCAB for i in range(1, n + 1)]


async def test_steps_replied_to_out_of_order_each_resolve_their_own_requests(stand_in):
    # without lookahead: a chained step cannot come back before the step it chains (nor does
    # it with real workers, whose last stage answers in order)
    async with Engine("tiny", tp=1, pp=2, pool=None, device="cpu", lookahead=False) as engine:
        workers = stand_in[0]
        a = asyncio.ensure_future(engine.infer([10], SamplingParams(max_tokens=4)))
        b = asyncio.ensure_future(engine.infer([50, 51], SamplingParams(max_tokens=6)))
        await next_turn()
        assert len(workers.pending) == 2  # step 1 went out before step 0 came back
        while not (a.done() and b.done()):
            if workers.pending:
                workers.reply(len(workers.pending) - 1)  # always the newest step first
            await asyncio.sleep(0)
        assert (await a).token_ids == expected([10], 4)
        assert (await b).token_ids == expected([50, 51], 6)


async def test_a_step_that_fails_on_the_only_worker_fails_just_its_requests(stand_in):
    async with Engine("tiny", pool=None, device="cpu") as engine:
        workers = stand_in[0]
        doomed = asyncio.ensure_future(engine.infer([10], SamplingParams(max_tokens=4)))
        await next_turn()
        workers.fail(0, RemoteError("RuntimeError", "out of memory", rank=0))
        with pytest.raises(RemoteError, match="out of memory"):
            await doomed
        fine = asyncio.ensure_future(engine.infer([20], SamplingParams(max_tokens=2)))
        await asyncio.sleep(0)
        while not fine.done():
            if workers.pending:
                workers.reply(0)
            await asyncio.sleep(0)
        assert (await fine).token_ids == expected([20], 2)
        assert engine.stats()["num_used_blocks"] == 0


async def test_a_step_that_fails_with_several_workers_fails_the_engine_instead_of_hanging(
    stand_in,
):
    async with Engine("tiny", tp=2, pool=None, device="cpu", max_restarts=0) as engine:
        workers = stand_in[0]
        first = asyncio.ensure_future(engine.infer([10], SamplingParams(max_tokens=4)))
        await next_turn()  # its step and the one chained to it are out: the next one waits
        waiting = asyncio.ensure_future(engine.infer([30], SamplingParams(max_tokens=4)))
        await next_turn()
        workers.fail(0, RemoteError("RuntimeError", "bad step", rank=1))
        with pytest.raises(RemoteError):
            await first
        with pytest.raises(EnergonError, match="out of step"):
            await waiting  # the other rank may wait in a collective forever: no silent hang
        with pytest.raises(EnergonError, match="out of step"):
            await engine.infer([1])


async def test_calls_from_another_event_loop_are_refused_with_a_clear_error(stand_in):
    async with Engine("tiny", pool=None, device="cpu") as engine:

        def elsewhere():
            return asyncio.run(engine.infer([1]))

        with pytest.raises(EnergonError, match="event loop it was started in"):
            await asyncio.to_thread(elsewhere)


async def test_a_prompt_that_is_not_unicode_is_refused_naming_the_prompt(stand_in):
    async with Engine("tiny", pool=None, device="cpu") as engine:
        with pytest.raises(InvalidRequest, match="not valid Unicode") as info:
            await engine.infer("ok \ud800", SamplingParams(max_tokens=2))
        assert info.value.field == "prompt"
        assert engine.stats()["requests"] == 0 and not stand_in[0].pending  # nothing queued


async def test_tiny_preset_reads_and_writes_text_with_the_byte_tokenizer(stand_in):
    async with Engine("tiny", pool=None, device="cpu") as engine:
        workers = stand_in[0]
        task = asyncio.ensure_future(engine.infer("hé!", SamplingParams(max_tokens=3)))
        await asyncio.sleep(0)
        while not task.done():
            if workers.pending:
                workers.reply(0)
            await asyncio.sleep(0)
        done = await task
    # "hé!" is the UTF-8 bytes 104, 195, 169, 33; the stand-in continues 34, 35, 36: '"#$'.
    assert done.usage.prompt_tokens == 4
    assert (done.token_ids, done.text) == ([34, 35, 36], '"#$')


async def test_a_kv_cache_the_workers_have_no_room_for_is_an_invalid_request(stand_in, monkeypatch):
    refusal = "is 99 bytes, more than the 10 bytes worker 0 has room for"
    monkeypatch.setattr(StandInWorkers, "refuse_kv", refusal)
    engine = Engine("tiny", pool=None, device="cpu", kv_cache_memory=99)
    with pytest.raises(InvalidRequest, match="kv_cache_memory is 99 bytes") as info:
        await engine.start()
    assert info.value.field == "kv_cache_memory"
    await engine.shutdown()


async def test_the_next_step_goes_out_before_a_token_is_detokenized_and_a_stop_string_wins(
    stand_in, monkeypatch
):
    """With pipeline stages the next step is sent as soon as the scheduler has the tokens (the
    requests' detokenizing would otherwise be a gap on every stage). A stop string found after
    that ends the request at once; the step already sent with it computes a token nobody gets,
    and its blocks come back when that step returns."""
    from energon.request import Request

    pending_at_token = []
    on_token = Request.on_token

    def spy(self, token_id, logprob=None):
        pending_at_token.append((token_id, len(stand_in[0].pending)))
        return on_token(self, token_id, logprob)

    monkeypatch.setattr(Request, "on_token", spy)
    # without lookahead (with it the next step is out before the reply: the test below)
    async with Engine("tiny", tp=1, pp=2, pool=None, device="cpu", lookahead=False) as engine:
        workers = stand_in[0]
        free = engine.stats()["num_free_blocks"]
        # "a" is byte 97; the stand-in continues 98 "b", 99 "c", 100 "d", ...
        task = asyncio.ensure_future(engine.infer("a", SamplingParams(max_tokens=10, stop=["c"])))
        await next_turn()
        workers.reply(0)  # step 0 samples "b"
        for _ in range(3):  # the step's task resumes
            await asyncio.sleep(0)
        assert pending_at_token == [(98, 1)]  # step 1 went out before "b" reached the request
        workers.reply(0)  # step 1 samples "c": step 2 goes out, then the stop string ends it
        done = await task
        assert (done.text, done.finish_reason, done.token_ids) == ("b", "stop", [98, 99])
        assert len(workers.pending) == 1 and engine.stats()["num_free_blocks"] < free
        workers.reply(0)  # step 2 comes back: its token is dropped, the blocks are free
        for _ in range(3):
            await asyncio.sleep(0)
        assert engine.stats()["num_free_blocks"] == free and not workers.pending
    assert [token for token, _ in pending_at_token] == [98, 99]


@pytest.mark.parametrize("requests", [1, energon.engine.TOKENS_FIRST_ROWS + 1])
async def test_with_a_step_in_flight_a_small_step_hands_its_tokens_over_before_the_next_kick(
    stand_in, monkeypatch, requests
):
    """With lookahead the reply of step k comes while step k+1 (chained) is on the workers:
    the next kick is not urgent, so a step of few rows gives its tokens to their requests
    first (its first token a kick earlier). Past TOKENS_FIRST_ROWS the kick goes first, as
    without a step in flight."""
    from energon.request import Request

    pending_at_token = []
    on_token = Request.on_token

    def spy(self, token_id, logprob=None):
        pending_at_token.append(len(stand_in[0].pending))
        return on_token(self, token_id, logprob)

    monkeypatch.setattr(Request, "on_token", spy)
    async with Engine("tiny", pool=None, device="cpu", max_num_seqs=16) as engine:
        workers = stand_in[0]
        prompts = [[10 + i] for i in range(requests)]
        tasks = [
            asyncio.ensure_future(engine.infer(p, SamplingParams(max_tokens=4))) for p in prompts
        ]
        await next_turn()
        assert len(workers.pending) == 2  # the prompts' step and its chained next
        workers.reply(0)
        for _ in range(3):  # the step's task resumes
            await asyncio.sleep(0)
        # tokens first: only the chained step was out; kick first: the step after it too
        before = 1 if requests <= energon.engine.TOKENS_FIRST_ROWS else 2
        assert pending_at_token == [before] * requests
        assert len(workers.pending) == 2  # either way the kick sent the next step
        while not all(t.done() for t in tasks):
            if workers.pending:
                workers.reply(0)
            await asyncio.sleep(0)
        for p, t in zip(prompts, tasks, strict=True):
            assert (await t).token_ids == expected(p, 4)


async def test_pipeline_lookahead_chains_each_step_and_names_the_oldest_in_flight(stand_in):
    """At pp > 1 with lookahead a lone request's next step goes out behind its step in flight,
    fed by the tokens the last stage hands to the first; every step says the oldest step in
    flight, before which the first stage may drop what it was handed."""
    async with Engine("tiny", tp=1, pp=2, pool=None, device="cpu") as engine:
        workers = stand_in[0]
        task = asyncio.ensure_future(engine.infer([10], SamplingParams(max_tokens=6)))
        await next_turn()
        first, second = (msg for msg, _, _ in workers.pending)
        assert second["chain_from"] == first["step_id"]
        assert first["hand_back"] == second["hand_back"] == first["step_id"]
        while not task.done():
            if workers.pending:
                workers.reply(0)  # in order, as the last stage answers
            await asyncio.sleep(0)
        assert (await task).token_ids == expected([10], 6)
        sent = workers.sent
        assert sum("chain_from" in m for m in sent) == len(sent) - 1 == 5
        oldest = [m["hand_back"] for m in sent]
        assert oldest == sorted(oldest)
        assert all(m["hand_back"] <= m["step_id"] for m in sent)
        # a chained step's source is still in flight when it is sent
        assert all(m["chain_from"] >= m["hand_back"] for m in sent if "chain_from" in m)
        assert oldest[-1] > oldest[0]  # steps that came back are named as such
