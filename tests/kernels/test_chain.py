"""The decode step's kernels chain as programmatic dependent launches in one order (chain.py).

Compiled for an H100/H200 (sm_90) on this machine, no GPU needed: in the PTX of a kernel
launched as a dependent launch, the release of the next kernel comes right after the wait for the
kernel before, and before the wait a kernel reads only what no kernel writes (its weights, biases
and norm weights: every load there goes through an address computed from those parameters) and
prefetches weights into L2. Releasing before the wait let the chain run many kernels ahead
(765ced1, docs/benchmarks.md). The GPU tests check the results (tests/kernels/test_gemv.py,
tests/engine/test_engine_parity.py).
"""

from __future__ import annotations

import re

import pytest
import torch

from energon.kernels import PDL_SWITCH, dependent_launch

WAIT, RELEASE = "griddepcontrol.wait", "griddepcontrol.launch_dependents"


def _ptx(fn, signature: dict, constants: dict, num_warps: int, num_stages: int) -> list[str]:
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn, {**signature, **dict.fromkeys(constants, "constexpr")}, constants)
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    except RuntimeError as exc:  # a triton built without its CUDA back end
        pytest.skip(f"no sm_90 compiler here: {exc}")
    return compiled.asm["ptx"].splitlines()


def _first(lines: list[str], pattern: str) -> int:
    return next(i for i, line in enumerate(lines) if re.search(pattern, line))


LOAD = re.compile(r"^\s*(@%p\d+\s+)?(ld\.global|cp\.async)")


def _loads_before_wait(ptx: list[str]) -> list[set[int]]:
    """For each global load before the wait, the kernel parameters (by index) its address was
    computed from."""
    return _loads_before(ptx, _first(ptx, re.escape(WAIT)))


def _loads_before(ptx: list[str], stop: int) -> list[set[int]]:
    """For each global load before line `stop`, the kernel parameters (by index) its address
    was computed from: registers are followed from each `ld.param` through every instruction
    that writes one (its first operand) from others."""
    sources: dict[str, set[int]] = {}
    loads = []
    for line in ptx[:stop]:
        code = line.split("//")[0]
        if param := re.search(r"ld\.param\S*\s+(%\w+), \[\w+_param_(\d+)\]", code):
            sources[param[1]] = {int(param[2])}
        elif LOAD.search(code):
            address = re.search(r"\[\s*(%\w+)", code)[1]
            loads.append(sources.get(address, set()))
        elif regs := re.findall(r"%\w+", code.split(";")[0]):
            if not code.strip().startswith(("@", "setp", "prefetch", "bra")):
                dst, *srcs = regs
                sources[dst] = set().union(*(sources.get(r, set()) for r in srcs))
    return loads


def _gemv_ptx(pdl: bool) -> list[str]:
    from energon.kernels import gemv_kernels

    pointers = dict.fromkeys(("X", "W", "Bias", "Y"), "*fp16")
    ints = dict.fromkeys(("M", "N", "K", "stride_xm", "stride_wn", "stride_ym", "prefetch"), "i32")
    constants = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, HAS_BIAS=True, RELU=False, PDL=pdl)
    return _ptx(gemv_kernels._gemv_kernel, {**pointers, **ints}, constants, 4, 5)


def test_a_dependent_gemv_prefetches_and_reads_its_bias_then_waits_releases_and_reads_x():
    ptx = _gemv_ptx(pdl=True)
    assert sum(WAIT in line for line in ptx) == 1
    assert sum(RELEASE in line for line in ptx) == 1
    wait, release = _first(ptx, re.escape(WAIT)), _first(ptx, re.escape(RELEASE))
    assert _first(ptx, r"prefetch\.global\.L2") < wait < release
    # parameters: X 0, W 1, Bias 2, Y 3; x's tiles (and the weights' pipelined ones) after it
    before = _loads_before_wait(ptx)
    assert before and all(p == {2} for p in before)
    assert any(LOAD.search(line) for line in ptx[release:])


def test_a_plain_gemv_neither_waits_nor_releases():
    ptx = "\n".join(_gemv_ptx(pdl=False))
    assert WAIT not in ptx and RELEASE not in ptx and "prefetch.global" not in ptx


def test_the_norm_kernel_waits_then_releases_before_reading_its_row():
    from energon.kernels import norm_kernels

    pointers = dict.fromkeys(("X", "Residual", "Summed", "Out", "Weight", "Bias"), "*fp16")
    ints = dict.fromkeys(("stride_x", "stride_r", "stride_s", "stride_o", "width"), "i32")
    constants = dict(RMS=True, ADD=True, HAS_WEIGHT=True, HAS_BIAS=False, BLOCK=8192, PDL=True)
    ptx = _ptx(norm_kernels._norm_kernel, {**pointers, **ints, "eps": "fp32"}, constants, 16, 1)
    wait, release = _first(ptx, re.escape(WAIT)), _first(ptx, re.escape(RELEASE))
    assert wait < release
    # only the norm's weight (parameter 4) before the wait; x (0) and the residual (1) after it
    before = _loads_before_wait(ptx)
    assert before and all(p == {4} for p in before)
    assert sum(bool(LOAD.search(line)) for line in ptx[release:]) >= 2


STORE = re.compile(r"^\s*(@%p\d+\s+)?st\.global")


def _fused_norm_ptx(**constants) -> list[str]:
    from energon.kernels import one_shot_norm

    pointers = dict.fromkeys(
        ("X", "Residual", "Summed", "Out", "Weight", "NormBias", "Bias", "buffers"), "*fp16"
    )
    ints = dict.fromkeys(("stride_r", "width"), "i32") | {"eps": "fp32", "offset": "i64"}
    constants = dict(
        RANK=0, WORLD=2, RMS=False, ADD=True, HAS_WEIGHT=True, HAS_NORM_BIAS=True, HAS_BIAS=True,
        HALF=one_shot_norm.half_bytes(2), ROW=one_shot_norm.ROW_BYTES,
        ROWS=one_shot_norm.MAX_ROWS, BLOCK=8192, PDL=True, NORM=True,
    ) | constants  # fmt: skip
    return _ptx(one_shot_norm._one_shot_norm_kernel, {**pointers, **ints}, constants, 16, 1)


def test_the_fused_all_reduce_and_norm_reads_only_its_weights_and_addresses_before_waiting():
    ptx = _fused_norm_ptx(PUSHED=False)
    assert _first(ptx, re.escape(WAIT)) < _first(ptx, re.escape(RELEASE))
    # Weight 4, NormBias 5, Bias 6, the buffer table 7 (this rank's address); the call count,
    # x, the residual and the peers' rows only after the wait
    before = _loads_before_wait(ptx)
    assert {frozenset(p) for p in before} == {
        frozenset({4}),
        frozenset({5}),
        frozenset({6}),
        frozenset({7}),
    }


def test_rows_a_gemv_pushed_are_only_waited_for_and_their_count_comes_first():
    """With PUSHED the kernel never reads x (parameter 0) and stores nothing before the wait;
    it reads the row's call count (at the region's offset, 11, from the address the table 7
    gave) and the residual (1, its row stride 8) before it, beside the weights (4, 5, 6)."""
    ptx = _fused_norm_ptx(PUSHED=True)
    wait = _first(ptx, re.escape(WAIT))
    assert wait < _first(ptx, re.escape(RELEASE))
    assert not [p for p in _loads_before(ptx, len(ptx)) if 0 in p]
    assert not [line for line in ptx[:wait] if STORE.search(line)]
    before = {frozenset(p) for p in _loads_before_wait(ptx)}
    weights = {frozenset({4}), frozenset({5}), frozenset({6}), frozenset({7})}
    assert before == weights | {frozenset({11}), frozenset({1, 8})}


def test_paged_attention_loads_q_beside_the_new_keys_not_after_the_cache_writes_barrier():
    """q comes from the kernel before; loaded before the write of the new K/V into the cache
    and the barrier after it, its round trip overlaps theirs instead of following them."""
    from energon.parallel import paged_attention

    pointers = dict(Q="*fp16", K="*fp16", V="*fp16", Out="*fp16", OutPart="*fp32")
    pointers |= dict(LsePart="*fp32", Tickets="*i32", KNew="*fp16", VNew="*fp16")
    pointers |= dict(SlotMapping="*i64", BlockTables="*i32", ContextLens="*i32")
    pointers |= dict(CuSeqlens="*i32", Slopes="*fp32", PrefixLens="*i32", qk_scale="fp32")
    strides = [
        f"stride_{s}" for s in "qt qh kb ks kh vb vs vh nt nh ot oh bt ps pt ph ls lt".split()
    ]
    constants = dict(HEAD_DIM=128, GROUP=1, PAGE=16, BLOCK_M=16, BLOCK_N=64, BLOCK_D=128)
    constants |= dict(MAX_Q=1, USE_ALIBI=False, WRITE=True, SPLIT=True, SPLITS=16)
    constants |= dict(PREFIX_PARTS=0, FOLD=False, VALID_M=1, COMBINE_M=1, IEEE=False, PDL=True)
    signature = {**pointers, **dict.fromkeys(strides, "i32")}
    ptx = _ptx(paged_attention._paged_attn_kernel, signature, constants, 4, 3)
    wait = _first(ptx, re.escape(WAIT))
    barrier = next(i for i, line in enumerate(ptx) if i > wait and "bar.sync" in line)
    loaded = _loads_before(ptx, barrier)[len(_loads_before_wait(ptx)) :]
    # parameters: Q 0, KNew 7, VNew 8 (the addresses also take strides)
    assert all(any(p in sources for sources in loaded) for p in (0, 7, 8))


def test_only_hopper_gpus_launch_dependently_and_the_switch_turns_it_off(monkeypatch):
    assert not dependent_launch(torch.device("cpu"))
    monkeypatch.setenv(PDL_SWITCH, "0")
    assert not dependent_launch(torch.device("cuda", 0))  # decided before asking the device
