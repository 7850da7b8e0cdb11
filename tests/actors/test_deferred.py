"""Sync methods that return a Deferred: the worker starts the calls already waiting before it
replies, and replies in call order."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from energon.actors import ActorGroup
from energon.errors import RemoteError, WorkerFailed

from .sample_actors import Later

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def group():
    g = await ActorGroup.spawn(Later, 1)
    yield g
    await g.shutdown()


async def test_next_call_starts_before_the_deferred_reply_and_replies_keep_call_order(group):
    worker = group[0]
    n = 20
    futures = [worker.call("launch", i, last=i == n - 1) for i in range(n)]
    done_order: list[int] = []
    for fut in futures:
        fut.add_done_callback(lambda f: done_order.append(f.result()))
    assert await asyncio.gather(*futures) == list(range(n))
    log = await worker.call("log")
    assert log["stalls"] == []  # each result waited for the next call to start, and it did
    for i in range(n - 1):  # call i + 1 started before call i's reply was made
        assert log["order"].index(f"start {i + 1}") < log["order"].index(f"reply {i}")
    assert done_order == list(range(n))


async def test_a_plain_call_behind_a_deferred_one_replies_after_it(group):
    worker = group[0]
    slow = worker.call("launch", 100)  # ready only once call 101 starts: 2 s from now
    plain = worker.call("now", "x")
    await asyncio.sleep(0.3)
    assert not plain.done() and not slow.done()  # a reply never overtakes an earlier one
    await asyncio.sleep(0)
    follow = worker.call("launch", 101, last=True)
    assert await asyncio.gather(slow, plain, follow) == [100, "x", 101]


async def test_a_ready_deferred_reply_goes_out_before_the_calls_queued_behind_it_run(group):
    """A pipeline stage's worker gets every micro-batch's step at once: the reply of a step its
    device finished must not wait until the steps queued behind it have all run."""
    worker = group[0]
    ready = worker.call("launch", 200, last=True)  # ready as soon as it is launched
    pauses = [worker.call("pause", str(k), 0.4) for k in range(3)]
    assert await ready == 200
    assert not pauses[-1].done()
    assert await asyncio.gather(*pauses) == ["0", "1", "2"]
    order = (await worker.call("log"))["order"]
    assert order.index("reply 200") < order.index("pause 2")


async def test_errors_of_wait_and_result_become_error_replies(group):
    worker = group[0]
    for where in ("wait", "result"):
        with pytest.raises(RemoteError, match=f"failed in {where}") as info:
            await worker.call("failing", where)
        assert info.value.remote_type == "ValueError"
    assert await worker.call("now", 1) == 1


async def test_shutdown_with_a_deferred_call_outstanding_ends_promptly():
    g = await ActorGroup.spawn(Later, 1, kwargs={"patience": 0.5})
    fut = g[0].call("launch", 0)  # its wait gives up after 0.5 s (a stall), then it replies
    await asyncio.sleep(0.05)
    started = asyncio.get_running_loop().time()
    await g.shutdown()
    assert asyncio.get_running_loop().time() - started < 3.0
    with pytest.raises(WorkerFailed, match="shut down"):
        fut.result()
