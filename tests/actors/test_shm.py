"""Large tensors through shared memory between a controller and workers on one host.

Where a tensor arrived is checked independently of the runtime: the receiving process's
/proc/self/maps names the memfd mapping that holds the tensor's data.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import textwrap
from pathlib import Path

import msgpack
import pytest
import pytest_asyncio
import torch

from energon.actors import ActorGroup, payload, protocol, shm
from energon.actors.handle import CallFuture
from energon.errors import RemoteError

from .conftest import eventually, process_gone
from .sample_actors import Echo, digest, mapping_of, random_bits
from .test_attach import free_port, start_worker

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]
MIB = 1 << 20


def segment(group: ActorGroup, direction: str, rank: int) -> str:
    """The path under which rank's segment for direction ("to" / "from" the worker) is mapped."""
    link = group._links[rank]
    return "/memfd:" + (link.writer if direction == "to" else link.reader).segment.name


def segments_of(group: ActorGroup) -> set[str]:
    return {segment(group, d, r) for r in range(group.world_size) for d in ("to", "from")}


def energon_segments(pid: int, controller_pid: int | None = None) -> list[str]:
    """The energon memfds (of controller_pid's groups) that process pid maps or holds open."""
    prefix = f"/memfd:energon-{controller_pid or ''}"
    found = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith(prefix):
                    found.append(fields[5].removesuffix(" (deleted)\n").strip())
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(prefix):
                found.append(target.removesuffix(" (deleted)"))
    except OSError:  # gone, or not ours to read
        pass
    return found


def dev_shm_energon() -> list[str]:
    return [name for name in os.listdir("/dev/shm") if "energon" in name]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def group():
    g = await ActorGroup.spawn(Echo, 2)
    yield g
    await g.shutdown()


DTYPES = [
    torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64, torch.int64,
    torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn,
]  # fmt: skip


def views(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An 8 MiB tensor and views of it, each of at least 1 MiB (the shared-memory threshold)."""
    base = random_bits(dtype, (2048, 4096 // dtype.itemsize), seed=dtype.itemsize)
    return {
        "whole": base,
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "rows": base[1000:1300],
        "3d": base.view(64, 32, -1)[:, ::2],
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
async def test_large_tensors_roundtrip_bit_exact_through_shared_memory(group, dtype):
    for name, sent in views(dtype).items():
        back = await group[0].call("echo", sent)
        assert back.dtype == dtype and back.shape == sent.shape, name
        assert digest(back) == digest(sent), name
        assert mapping_of(back.data_ptr()).startswith(segment(group, "from", 0)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8], ids=str)
async def test_controller_to_worker_arrives_exact_in_the_workers_segment(group, dtype):
    for name, sent in views(dtype).items():
        got = await group[1].call("digest", sent)
        assert got["digest"] == digest(sent), name
        assert got["mapping"].startswith(segment(group, "to", 1)), name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "complex64", "bool"])
async def test_worker_to_controller_arrives_exact_in_the_controllers_segment(group, dtype):
    got = await group[0].call("random_tensor", dtype, [1024, 1024], 5)
    assert digest(got) == digest(random_bits(getattr(torch, dtype), (1024, 1024), 5))
    assert mapping_of(got.data_ptr()).startswith(segment(group, "from", 0))


async def test_received_tensors_outlive_their_messages_on_both_sides(group):
    kept = [await group[0].call("random_tensor", "float32", [MIB], seed) for seed in range(3)]
    sent = [random_bits(torch.float32, (MIB,), 10 + seed) for seed in range(3)]
    for t in sent:
        await group[0].call("hold", t)
    for _ in range(20):  # traffic that would overwrite any block wrongly reused
        await group[0].call("echo", torch.full((MIB,), 7.0))
    assert [digest(t) for t in kept] == [
        digest(random_bits(torch.float32, (MIB,), seed)) for seed in range(3)
    ]
    assert await group[0].call("held_digests") == [digest(t) for t in sent]


async def test_tensors_below_the_threshold_travel_as_frames(group):
    small = torch.arange(1000, dtype=torch.float32)
    back = await group[0].call("echo", small)
    assert torch.equal(back, small)
    assert not mapping_of(back.data_ptr()).startswith("/memfd:energon")


async def test_broadcast_puts_a_large_tensor_in_each_ranks_segment(group):
    t = random_bits(torch.bfloat16, (1024, 1024), 3)
    got = await group.broadcast("digest", t)
    assert [g["digest"] for g in got] == [digest(t)] * 2
    assert [g["mapping"].split(" ")[0] for g in got] == [segment(group, "to", r) for r in range(2)]


async def test_broadcast_encodes_a_message_of_small_tensors_once_for_every_rank(group, monkeypatch):
    """A pipeline step (token ids, block tables: small tensors) goes to every rank each step:
    only a tensor that shared memory takes needs each rank's own encoding."""
    encodes = []
    real = protocol.encode_call

    def counted(*args, **kwargs):
        encodes.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "encode_call", counted)
    small = torch.arange(1000, dtype=torch.float32)
    got = await group.broadcast("echo", {"ids": small, "tables": small.int()})
    assert [torch.equal(g["tables"], small.int()) for g in got] == [True, True]
    assert encodes == ["echo"]
    encodes.clear()
    await group.broadcast("digest", random_bits(torch.bfloat16, (1024, 1024), 4))
    assert encodes == ["digest"] * 3  # shared, then one per rank into its segment


async def test_full_segment_falls_back_to_frames_and_stays_exact():
    async with await ActorGroup.spawn(Echo, 1, shm_segment_bytes=8 * MIB) as g:
        held = [random_bits(torch.float32, (MIB,), seed) for seed in range(4)]  # 4 MiB each
        for t in held:
            await g[0].call("hold", t)  # the worker keeps them: their blocks stay taken
        assert g.stats()["shm_fallbacks"] >= 2
        assert await g[0].call("held_digests") == [digest(t) for t in held]


# ----------------------------------------------------------------------------------- no leaks


async def test_shutdown_leaves_no_segment_anywhere():
    before = dev_shm_energon()
    g = await ActorGroup.spawn(Echo, 1)
    pids = await g.broadcast("pid")
    await g.broadcast("echo", torch.ones(MIB))  # both directions used
    ours = segments_of(g)
    assert len(ours) == 2 and ours <= set(energon_segments(os.getpid()))  # the test sees them
    assert all(energon_segments(pid) for pid in pids)
    await g.shutdown()
    gc.collect()
    assert ours.isdisjoint(energon_segments(os.getpid()))
    assert all(process_gone(pid) for pid in pids)
    assert dev_shm_energon() == before


async def test_a_received_tensor_stays_valid_after_shutdown_and_its_segment_goes_with_it():
    g = await ActorGroup.spawn(Echo, 1)
    to_worker, from_worker = segment(g, "to", 0), segment(g, "from", 0)
    t = await g[0].call("random_tensor", "int32", [MIB], 9)
    await g.shutdown()
    gc.collect()
    assert digest(t) == digest(random_bits(torch.int32, (MIB,), 9))
    mapped = energon_segments(os.getpid())
    assert from_worker in mapped and to_worker not in mapped
    del t
    gc.collect()
    assert from_worker not in energon_segments(os.getpid())


async def test_worker_sigkill_releases_its_segments_and_the_others_keep_working():
    async with await ActorGroup.spawn(Echo, 2) as g:
        ours = segments_of(g)
        pids = await g.broadcast("pid")
        await g.broadcast("echo", torch.ones(MIB))
        os.kill(pids[1], signal.SIGKILL)
        await asyncio.wait_for(g.wait_failed(), 5)
        gc.collect()
        mapped = ours & set(energon_segments(os.getpid()))
        assert mapped == {segment(g, "to", 0), segment(g, "from", 0)}
        t = random_bits(torch.float16, (MIB,), 1)
        assert digest(await g[0].call("echo", t)) == digest(t)
    gc.collect()
    assert ours.isdisjoint(energon_segments(os.getpid()))


CONTROLLER = """
import asyncio, os, sys, torch
sys.path.insert(0, {tests!r})
from energon.actors import ActorGroup
from actors.sample_actors import Echo

async def main():
    group = await ActorGroup.spawn(Echo, 1)
    await group.broadcast("echo", torch.ones(1 << 20))
    print(os.getpid(), *await group.broadcast("pid"), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_controller_sigkill_leaves_no_segment_anywhere():
    before = dev_shm_energon()
    code = textwrap.dedent(CONTROLLER.format(tests=str(Path(__file__).parents[1])))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    controller, *workers = (
        int(p) for p in (await asyncio.wait_for(proc.stdout.readline(), 60)).split()
    )
    assert len(energon_segments(controller, controller)) >= 2
    assert all(energon_segments(pid, controller) for pid in workers)
    proc.kill()
    await proc.wait()
    assert await eventually(lambda: all(process_gone(p) for p in workers), 5)
    holders = [
        p for p in os.listdir("/proc") if p.isdigit() and energon_segments(int(p), controller)
    ]
    assert holders == []
    assert dev_shm_energon() == before


# --------------------------------------------------------------------------- forged headers


def forge(group: ActorGroup, rank: int, method: str, block: dict) -> asyncio.Future:
    """Sends rank a call whose one argument is the shared-memory block spec given."""
    msg_id = next(group._ids)
    arg = msgpack.ExtType(payload.EXT_SHM_TENSOR, msgpack.packb(block))
    head = msgpack.packb(
        {"v": protocol.VERSION, "id": msg_id, "kind": "call", "method": method,
         "meta": {"args": [arg], "kwargs": {}}}
    )  # fmt: skip
    fut = CallFuture(loop=group.loop)
    group._post(rank, method == "digest", msg_id, [head], fut)
    return fut


@pytest.mark.parametrize("method", ["digest", "aecho"], ids=["sync", "async"])
async def test_forged_block_specs_get_an_error_reply_and_the_worker_keeps_serving(group, method):
    writer = group._links[0].writer
    seg = writer.segment
    real = writer.put(torch.zeros(MIB))  # a block that was really sent (4 MiB), never claimed
    good = {"seg": seg.id, "dtype": "float32", "shape": [MIB]}
    forged = {
        "no such segment": dict(good, seg=seg.id ^ 1, off=real["off"], nbytes=4 * MIB),
        "never sent": dict(good, off=seg.size - 64 * shm.UNIT, nbytes=4 * MIB),
        "shorter than the block": dict(good, off=real["off"], nbytes=2 * MIB, shape=[MIB // 2]),
        "longer than the block": dict(good, off=real["off"], nbytes=8 * MIB, shape=[2 * MIB]),
        "size not the tensor's": dict(good, off=real["off"], nbytes=MIB),
        "outside the segment": dict(good, off=seg.size, nbytes=4 * MIB),
        "misaligned": dict(good, off=real["off"] + 8, nbytes=4 * MIB),
        "the token block": dict(good, off=0, nbytes=4 * MIB),
        "not ints": dict(good, off=str(real["off"]), nbytes=4 * MIB),
    }
    before = (await group[0].call("__energon_stats__"))["invalid"]
    for problem, block in forged.items():
        with pytest.raises(RemoteError) as info:
            await asyncio.wait_for(forge(group, 0, method, block), 5)
        assert info.value.remote_type == "energon.errors.ProtocolError", problem
        assert "shared-memory" in info.value.message, problem
    assert (await group[0].call("__energon_stats__"))["invalid"] == before + len(forged)
    assert await group[0].call("echo", "alive") == "alive"
    got = await asyncio.wait_for(forge(group, 0, method, dict(good, **real)), 5)  # the real one
    assert (got["digest"] if method == "digest" else digest(got)) == digest(torch.zeros(MIB))


# --------------------------------------------------------------------------- across hosts


async def test_attached_worker_on_this_host_uses_shared_memory_over_tcp():
    address = f"tcp://127.0.0.1:{free_port()}"
    worker = await start_worker(address, 0)
    g = await ActorGroup.attach("actors.sample_actors:Echo", 1, address=address, start_timeout=30)
    try:
        assert g.stats()["shm_links"] == 1
        t = random_bits(torch.bfloat16, (1024, 1024), 2)
        back = await g[0].call("echo", t)
        assert digest(back) == digest(t)
        assert mapping_of(back.data_ptr()).startswith(segment(g, "from", 0))
    finally:
        await g.shutdown()
    assert await asyncio.wait_for(worker.wait(), 10) == 0


async def test_with_shared_memory_off_large_tensors_travel_as_frames():
    async with await ActorGroup.spawn(Echo, 1, shm_segment_bytes=0) as g:
        t = random_bits(torch.bfloat16, (1024, 1024), 4)
        back = await g[0].call("echo", t)
        assert digest(back) == digest(t) and g.stats()["shm_links"] == 0
        assert not mapping_of(back.data_ptr()).startswith("/memfd:energon")
