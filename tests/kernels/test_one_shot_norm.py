"""The fused all-reduce + norm's push protocol (energon/kernels/one_shot_norm.py) on CPU.

In Triton's interpreter (a spawned worker with TRITON_INTERPRET=1, tests/conftest.py) one rank's
kernel runs against every rank's region in host memory: the test makes the peers' pushes itself,
before the kernel runs or, in one test, from another thread while the kernel waits. Checked: the
sum (float32 in rank order, the bias, one rounding, then the residual and the norm) equals the
sum computed here then the norm kernel, bit for bit; the rank's row lands in its slot on every
rank with -0.0 pushed as +0.0; the slots it read hold the sentinel again; calls alternate halves;
and a kernel whose peer has not pushed yet waits for it. Two GPUs run it for real in
tests/parallel/test_allreduce.py.
"""

from __future__ import annotations

import pytest
import torch

OFFSET = 48  # the region's offset in each buffer (16-byte aligned, not zero)
TIMEOUT = 300  # seconds for one worker call: a kernel that never stops waiting fails the test


def _regions(world: int):
    """Every rank's buffer with its region prepared, and the table of their addresses."""
    from energon.kernels import one_shot_norm

    size = OFFSET + one_shot_norm.region_bytes(world)
    buffers = [torch.zeros(size, dtype=torch.uint8) for _ in range(world)]
    for buffer in buffers:
        one_shot_norm.prepare_region(buffer, OFFSET, world)
    table = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    return buffers, table


def _slot(buffer: torch.Tensor, world: int, call: int, source: int, row: int, width: int):
    """The int16 view of `source`'s slot for `row` in `buffer`'s half for call `call`."""
    from energon.kernels import one_shot_norm as k

    start = OFFSET + (call % 2) * k.half_bytes(world) + (source * k.MAX_ROWS + row) * k.ROW_BYTES
    return buffer[start : start + 2 * width].view(torch.int16)


def _pushed(x: torch.Tensor) -> torch.Tensor:
    """x's bits as a kernel pushes them: -0.0 as +0.0."""
    bits = x.view(torch.int16).clone()
    bits[bits == -32768] = 0
    return bits


def _push(buffers, world, calls, source, x, into) -> None:
    """What rank `source`'s kernel stores into the ranks `into` (calls[row]: the row's call)."""
    for rank in into:
        for row, bits in enumerate(_pushed(x)):
            _slot(buffers[rank], world, calls[row], source, row, x.shape[1]).copy_(bits)


def _case(world: int, rows: int, width: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).half()

    xs = [randn(rows, width) for _ in range(world)]
    for r, x in enumerate(xs):
        x[0, r] = -0.0  # pushed as +0.0
        x[-1, -1] = -0.0 if r % 2 else 0.0
    return dict(
        xs=xs,
        residual=randn(rows, width),
        weight=randn(width).abs() + 0.5,
        norm_bias=randn(width),
        bias=randn(width),
    )


def _fused(case, rank, table, world, rms, pushed=False, normalised=True):
    from energon.kernels.one_shot_norm import one_shot_add_norm

    return one_shot_add_norm(
        case["xs"][rank],
        case["residual"],
        case["weight"],
        case["norm_bias"],
        1e-5,
        rms,
        case["bias"],
        table.data_ptr(),
        rank,
        world,
        OFFSET,
        pushed,
        normalised,
    )


def _calls(
    world: int, rank: int, shapes, rms: bool, pushed: bool = False, normalised: bool = True
) -> list[dict]:
    """Runs in the interpreter: rank `rank`'s kernel, call after call (`shapes`: rows, width),
    every peer's push made first (and, `pushed`, this rank's own, as its GEMV makes it: the
    kernel then pushes nothing); what each call gave and left in the regions. Not
    `normalised`: the sum alone, and no normed rows."""
    from energon.kernels import one_shot_norm as k
    from energon.kernels.norm_kernels import norm_rows

    buffers, table = _regions(world)
    peers = [r for r in range(world) if r != rank]
    counts = [0] * k.MAX_ROWS  # calls of each row so far
    results = []
    for i, (rows, width) in enumerate(shapes):
        case = _case(world, rows, width, seed=i)
        calls = [counts[row] + 1 for row in range(rows)]  # each row counts its own calls
        for source in peers:
            _push(buffers, world, calls, source, case["xs"][source], into=[rank])
        given = case
        if pushed:  # the kernel must take this rank's rows from its slots, not from x
            _push(buffers, world, calls, rank, case["xs"][rank], into=[rank])
            given = {**case, "xs": [torch.full_like(x, 7.0) for x in case["xs"]]}
        normed, summed = _fused(given, rank, table, world, rms, pushed, normalised)
        total = torch.zeros(rows, width)
        for x in case["xs"]:  # float32, in rank order, as the kernel sums
            total += x.float()
        once = (total + case["bias"].float()).half()
        want = norm_rows(once, case["weight"], case["norm_bias"], 1e-5, rms, case["residual"])
        half = k.half_bytes(world)
        halves = buffers[rank][OFFSET : OFFSET + 2 * half].view(torch.int16)
        mine = _pushed(case["xs"][rank])
        # what the kernel left in this rank's slots on the peers: its rows; with `pushed` (the
        # GEMV pushed them) nothing, the sentinel still
        landed = [
            torch.equal(slot, mine[row]) if not pushed else bool((slot == -32768).all())
            for r in peers
            for row in range(rows)
            if (slot := _slot(buffers[r], world, calls[row], rank, row, width)) is not None
        ]
        for r in peers:  # the peers read and cleared their slots: clear them here
            for row in range(rows):
                _slot(buffers[r], world, calls[row], rank, row, width).fill_(-32768)
        counters = buffers[rank][OFFSET + 2 * half : OFFSET + k.region_bytes(world)]
        for row in range(rows):
            counts[row] += 1
        results.append(
            {
                "normed_equal": torch.equal(normed, want[0]) if normalised else normed is None,
                "summed_equal": torch.equal(summed, want[1]),
                "pushed": all(landed),
                "own_slots_cleared": bool((halves == -32768).all()),
                "counts": counters.view(torch.int32)[: k.MAX_ROWS].tolist() == counts,
                "halves": [c % 2 for c in calls],
            }
        )
    return results


def _waits_for_the_last_peer(world: int) -> dict:
    """Runs in the interpreter: rank 0's kernel starts with one peer's push missing; another
    thread makes it half a second later."""
    import threading

    from energon.kernels.norm_kernels import norm_rows

    buffers, table = _regions(world)
    case = _case(world, 2, 256, seed=7)
    for source in range(1, world - 1):
        _push(buffers, world, [1, 1], source, case["xs"][source], into=[0])
    out: list = []
    kernel = threading.Thread(target=lambda: out.append(_fused(case, 0, table, world, True)))
    kernel.start()
    kernel.join(0.5)
    waited = kernel.is_alive() and not out
    _push(buffers, world, [1, 1], world - 1, case["xs"][world - 1], into=[0])
    kernel.join(TIMEOUT / 2)
    total = sum(x.float() for x in case["xs"])
    once = (total + case["bias"].float()).half()
    want = norm_rows(once, case["weight"], case["norm_bias"], 1e-5, True, case["residual"])
    return {
        "waited": waited,
        "finished": not kernel.is_alive(),
        "equal": bool(out) and all(map(torch.equal, out[0], want)),
    }


@pytest.mark.parametrize("world, rank", [(2, 1), (4, 2)])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("pushed", [False, True], ids=["kernel_pushes", "gemv_pushed"])
def test_interpreted_push_sum_and_norm(triton_interpreter, world, rank, rms, pushed):
    shapes = [(1, 512), (3, 1000), (1, 512), (2, 64)]  # rows of a call may be in either half
    args = (world, rank, shapes, rms, pushed)
    results = triton_interpreter.apply_async(_calls, args).get(TIMEOUT)
    for i, r in enumerate(results):
        assert r["normed_equal"] and r["summed_equal"], i
        assert r["pushed"], i
        assert r["own_slots_cleared"], i
        assert r["counts"], i
    assert [r["halves"] for r in results] == [[1], [0, 1, 1], [1], [0, 0]]


def test_interpreted_pushed_sum_alone_normalises_nothing(triton_interpreter):
    """`pushed_sum`'s call: the same sum, slots and counts as a normalising call, no norm."""
    shapes = [(1, 512), (3, 1000), (2, 64)]
    results = triton_interpreter.apply_async(_calls, (2, 1, shapes, False, True, False))
    for i, r in enumerate(results.get(TIMEOUT)):
        assert r["normed_equal"] and r["summed_equal"], i
        assert r["pushed"] and r["own_slots_cleared"] and r["counts"], i


def test_interpreted_kernel_waits_for_a_late_peer(triton_interpreter):
    result = triton_interpreter.apply_async(_waits_for_the_last_peer, (3,)).get(TIMEOUT)
    assert result == {"waited": True, "finished": True, "equal": True}
