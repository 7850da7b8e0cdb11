"""One-shot all-reduce of a small message over NVLink peer memory, in one Triton kernel.

torch's one-shot kernels (`torch.ops.symm_mem.one_shot_all_reduce*`) take bfloat16 and float32
only, and meet the peers twice per call (before reading their buffers, and after, so that nobody
overwrites a buffer still being read). This one takes any float dtype and meets them once. Each
rank calls `one_shot_sum` with its message `x`; it becomes `sum over ranks (+ bias)`, computed in
float32 in rank order and rounded once, so every rank holds the same bits.

Program `p` owns bytes [p * BLOCK_BYTES, (p + 1) * BLOCK_BYTES) of every message, on every rank,
whatever its dtype, and counts its calls in this rank's `counters[p]`. Call number c of program p:

1. copies its slice of `x` into half c % 2 of this rank's symmetric buffer;
2. stores c into its slot of every rank's flags (`flags[p * world + rank]`, release), and waits
   until each of its own slots holds c or c + 1 (acquire);
3. reads its slice of half c % 2 from every rank's buffer over NVLink, sums them (adds the
   bias) and stores the result in `out`.

No second meeting is needed: a peer writes half c % 2 again only at call c + 2, after it has
seen this rank's flag c + 1, which this rank stores only after call c has ended (kernels on one
stream end in order). For the same reason a flag is never more than one call ahead, so the
counts may wrap around 2**32. The counts live on the device, so a CUDA graph can replay the
kernel; every rank must issue the same calls (the decode graphs do). A peer that never arrives
leaves the kernel waiting for good: `energon.parallel.allreduce` runs it only after every rank has
checked it.

The symmetric buffer holds, from `data_offset`: two halves of `half_bytes`, then the flags
(`max_programs * world` uint32), then the counts (`max_programs` uint32), all zero at first
(`control_bytes` says how much that is).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_BYTES = 2048  # per program, whatever the dtype: 16 bytes per thread of 4 warps
NUM_WARPS = 4


def control_bytes(half_bytes: int, world: int) -> int:
    """Bytes from `data_offset` that the kernel uses for messages of up to `half_bytes`."""
    programs = max_programs(half_bytes)
    return 2 * half_bytes + 4 * programs * (world + 1)


def max_programs(half_bytes: int) -> int:
    return triton.cdiv(half_bytes, BLOCK_BYTES)


@triton.jit
def _thread_index():
    return tl.inline_asm_elementwise(
        "mov.u32 $0, %tid.x;", "=r", [], dtype=tl.int32, is_pure=True, pack=1
    )


# stores `value` in a (peer's) slot, after this program's writes (release, system)
_POST = tl.constexpr("st.global.release.sys.b32 [$1], $2; mov.u32 $0, 0;")
# waits until this rank's slot holds `value` or `value + 1` (modulo 2**32), then sees the
# poster's writes (acquire, system)
_AWAIT = tl.constexpr(
    """
    {
        .reg .u32 %seen, %ahead;
        .reg .pred %arrived;
    poll:
        ld.global.acquire.sys.b32 %seen, [$1];
        sub.u32 %ahead, %seen, $2;
        setp.le.u32 %arrived, %ahead, 1;
        @!%arrived bra poll;
        mov.u32 $0, %seen;
    }
    """
)


@triton.jit
def _on_slot(ASM: tl.constexpr, slot, value):
    """Runs one of the flag operations above on `slot` (a uint32 pointer) with `value`."""
    tl.inline_asm_elementwise(ASM, "=r,l,r", [slot, value], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _one_shot_kernel(
    X,
    Out,
    Bias,
    buffers,  # device address of WORLD buffer addresses (uint64)
    n,
    width,  # the bias's length (the message's last dimension)
    data_offset,  # bytes from a buffer's start to its first half
    half_bytes,
    max_programs,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0)
    dtype = X.dtype.element_ty
    table = buffers.to(tl.pointer_type(tl.uint64))
    mine = tl.load(table + RANK)
    flags = (mine + data_offset + 2 * half_bytes).to(tl.pointer_type(tl.uint32))
    counters = flags + max_programs * WORLD
    call = tl.load(counters + program) + 1  # uint32: wraps
    half = data_offset + (call % 2).to(tl.uint64) * half_bytes
    cols = program * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    slice_mine = tl.multiple_of((mine + half).to(tl.pointer_type(dtype)), 16)
    tl.store(slice_mine + cols, tl.load(X + cols, mask=mask), mask=mask)

    tl.debug_barrier()  # the whole slice is written before it is announced
    tid = _thread_index()
    for peer in tl.static_range(WORLD):
        if tid == peer:  # thread `peer` posts to rank `peer` and waits for it
            theirs = tl.load(table + peer)
            their_flags = (theirs + data_offset + 2 * half_bytes).to(tl.pointer_type(tl.uint32))
            _on_slot(_POST, their_flags + program * WORLD + RANK, call)
            _on_slot(_AWAIT, flags + program * WORLD + peer, call)
    tl.debug_barrier()  # every peer's slice is visible to every thread

    total = tl.zeros([BLOCK], dtype=tl.float32)
    for rank in tl.static_range(WORLD):
        theirs = tl.load(table + rank)
        slice_theirs = tl.multiple_of((theirs + half).to(tl.pointer_type(dtype)), 16)
        total += tl.load(slice_theirs + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        total += tl.load(Bias + cols % width, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + cols, total.to(dtype), mask=mask)
    if tid == 0:  # every thread read `call` before the barriers above
        tl.store(counters + program, call)


def one_shot_sum(
    x: torch.Tensor,
    out: torch.Tensor,
    buffer_ptrs: int,
    rank: int,
    world: int,
    data_offset: int,
    half_bytes: int,
    bias: torch.Tensor | None = None,
) -> None:
    """out = the sum of every rank's x (+ bias, broadcast over x's last dimension). `x` and
    `out` are contiguous (they may be one tensor) and hold at most `half_bytes`; `buffer_ptrs`
    is the device address of the ranks' symmetric buffer addresses, laid out as the module's
    docstring says from `data_offset`. Collective: every rank of the group calls it with the
    same shape, dtype and bias or none."""
    n = x.numel()
    if n * x.element_size() > half_bytes:
        raise ValueError(f"message of {n * x.element_size()} bytes over {half_bytes}")
    block = BLOCK_BYTES // x.element_size()
    _one_shot_kernel[(triton.cdiv(n, block),)](
        x,
        out,
        bias if bias is not None else x,
        buffer_ptrs,
        n,
        x.shape[-1],
        data_offset,
        half_bytes,
        max_programs(half_bytes),
        RANK=rank,
        WORLD=world,
        HAS_BIAS=bias is not None,
        BLOCK=block,
        num_warps=NUM_WARPS,
    )
