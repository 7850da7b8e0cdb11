"""Calls through a live group of two workers, under the default asyncio loop and under uvloop."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest
import pytest_asyncio
import torch

from energon.actors import ActorGroup
from energon.errors import RemoteError

from .sample_actors import Echo

BOTH_LOOPS = True
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def group():
    os.environ["ENERGON_TEST_INHERITED"] = "from-parent"
    g = await ActorGroup.spawn(
        Echo, 2, args=("t",), kwargs={"scale": 3}, env={"ENERGON_TEST_EXTRA": "42"}
    )
    yield g
    await g.shutdown()


async def test_call_returns_the_result(group):
    assert await group[0].call("echo", {"x": [1, 2]}) == {"x": [1, 2]}
    assert await group[1].call("echo_kwargs", 1, "a", key=None) == {
        "args": [1, "a"],
        "kwargs": {"key": None},
    }


async def test_actor_is_built_from_spawn_args_and_kwargs(group):
    assert await group.broadcast("init_args") == [{"tag": "t", "scale": 3}] * 2


async def test_broadcast_returns_results_in_rank_order(group):
    got = await group.broadcast("whoami")
    assert got == [{"rank": r, "world_size": 2, "address": group.address} for r in range(2)]
    assert group.world_size == len(group) == 2


async def test_workers_inherit_environment_plus_env(group):
    assert await group[0].call("getenv", "ENERGON_TEST_INHERITED") == "from-parent"
    assert await group[1].call("getenv", "ENERGON_TEST_EXTRA") == "42"


async def test_slow_call_issued_first_resolves_after_fast_call_issued_later(group):
    done = []
    slow = group[0].call("aecho", "slow", delay=0.5)
    fast = group[0].call("aecho", "fast")
    for fut in (slow, fast):
        fut.add_done_callback(lambda f: done.append(f.result()))
    assert await asyncio.gather(slow, fast) == ["slow", "fast"]
    assert done == ["fast", "slow"]


async def test_async_call_is_not_held_up_by_a_running_sync_call(group):
    blocking = group[1].call("sleep", 1.0, "sync")
    assert await asyncio.wait_for(group[1].call("aecho", "async"), 0.9) == "async"
    assert not blocking.done()
    assert await blocking == "sync"


async def test_async_methods_run_concurrently(group):
    start = time.monotonic()
    got = await asyncio.gather(*(group[0].call("aecho", i, delay=0.4) for i in range(20)))
    assert got == list(range(20))
    assert time.monotonic() - start < 0.4 * 20 / 4  # serially it would take 8 s


async def test_sync_methods_run_one_at_a_time_in_arrival_order(group):
    await asyncio.gather(*(group[1].call("record", i) for i in range(100)))
    recorded = await group[1].call("recorded")
    assert recorded[-100:] == list(range(100))


async def test_thousand_concurrent_calls_each_get_their_own_result(group):
    futs = [group[i % 2].call("echo" if i % 3 else "aecho", i) for i in range(1000)]
    assert await asyncio.gather(*futs) == list(range(1000))
    assert group.stats()["in_flight"] == 0


DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.int64,
    torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
]  # fmt: skip


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
async def test_tensors_of_every_dtype_shape_and_stride_roundtrip_bit_exact(group, dtype):
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, 256, (6 * 8 * dtype.itemsize,), generator=g, dtype=torch.uint8)
    base = base.view(dtype).reshape(6, 8)
    values = [base, base.t(), base[::2, 1::3], base[0], base[0, 0], base[:0], base.unsqueeze(0)]
    got = await group[0].call("echo", values)
    for sent, back in zip(values, got, strict=True):
        assert back.dtype == dtype and back.shape == sent.shape
        assert raw(back) == raw(sent)


async def test_large_tensor_ndarray_and_bytes_roundtrip(group):
    t = torch.randn(2 << 20, generator=torch.Generator().manual_seed(0))  # 8 MiB
    a = np.arange(300_000, dtype=np.int32).reshape(1000, 300)[:, ::3]
    b = os.urandom(1 << 20)
    back_t, back_a, back_b = await group[1].call("echo", (t, a, b))
    assert torch.equal(back_t, t)
    np.testing.assert_array_equal(back_a, a)
    assert back_b == b


async def test_remote_exception_carries_type_message_traceback_and_rank(group):
    with pytest.raises(RemoteError) as info:
        await group[1].call("boom", "no good")
    err = info.value
    assert (err.remote_type, err.message, err.rank) == ("ValueError", "no good", 1)
    assert "def boom" in err.traceback or "in boom" in err.traceback


async def test_async_remote_exception(group):
    with pytest.raises(RemoteError) as info:
        await group[0].call("aboom", "k")
    assert info.value.remote_type == "KeyError" and "in aboom" in info.value.traceback


@pytest.mark.parametrize("method", ["nope", "_private", "__init__"])
async def test_unknown_and_private_methods_raise_attribute_error(group, method):
    with pytest.raises(RemoteError) as info:
        await group[0].call(method)
    assert info.value.remote_type == "AttributeError"


async def test_wrong_arguments_raise_type_error_remotely(group):
    with pytest.raises(RemoteError) as info:
        await group[0].call("echo", 1, 2, 3)
    assert info.value.remote_type == "TypeError"


async def test_unsendable_argument_raises_type_error_before_sending(group):
    before = group.stats()["calls"]
    with pytest.raises(TypeError):
        group[0].call("echo", object())
    assert group.stats()["calls"] == before


async def test_unsendable_result_raises_remote_type_error(group):
    with pytest.raises(RemoteError) as info:
        await group[0].call("unsendable")
    assert info.value.remote_type == "TypeError"


async def test_cancelling_the_awaiting_task_cancels_the_remote_call(group):
    before = await group[0].call("cancellations", 0, 0)
    task = asyncio.ensure_future(group[0].call("wait_forever"))
    # on the same (io) channel, so wait_forever is already running when this one answers
    await group[0].call("aecho", None)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await group[0].call("cancellations", before + 1, 5.0) == before + 1
    assert group.stats()["in_flight"] == 0


async def test_cancelled_sync_call_still_queued_never_runs(group):
    busy = group[1].call("sleep", 0.3)
    doomed = group[1].call("record", "doomed")
    doomed.cancel()
    await busy
    assert "doomed" not in await group[1].call("recorded")


async def test_reply_of_a_cancelled_running_call_is_dropped_and_counted(group):
    late_before = group.stats()["late_replies"]
    running = group[0].call("sleep", 0.2, "late")
    await asyncio.sleep(0.05)  # let it start; the assertion below holds either way
    running.cancel()
    await group[0].call("ping")  # replies on one channel arrive in order: the late one came first
    assert group.stats()["late_replies"] in (late_before, late_before + 1)
    assert group.stats()["in_flight"] == 0


async def test_broadcast_cancel_cancels_every_rank(group):
    before = await group.broadcast("cancellations", 0, 0)
    fut = group.broadcast("wait_forever")
    await group.broadcast("aecho", None)  # same channel: wait_forever runs on every rank
    fut.cancel()
    got = await asyncio.gather(
        *(group[r].call("cancellations", before[r] + 1, 5.0) for r in range(2))
    )
    assert got == [before[0] + 1, before[1] + 1]
