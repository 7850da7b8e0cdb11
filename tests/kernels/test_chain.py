"""The decode step's kernels chain as programmatic dependent launches in one order (chain.py).

Compiled for an H100/H200 (sm_90) on this machine, no GPU needed: in the PTX of a kernel
launched as a dependent launch, the wait for the kernel before comes first, the release of the
next kernel right after it, and nothing that reads what the kernel before wrote (x) comes before
the wait; only the weights' L2 prefetches do. Releasing before the wait let the chain run many
kernels ahead (765ced1, docs/benchmarks.md). The GPU tests check the results
(tests/kernels/test_gemv.py, tests/engine/test_engine_parity.py).
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


def _gemv_ptx(pdl: bool) -> list[str]:
    from energon.kernels import gemv_kernels

    pointers = dict.fromkeys(("X", "W", "Bias", "Y"), "*fp16")
    ints = dict.fromkeys(("M", "N", "K", "stride_xm", "stride_wn", "stride_ym", "prefetch"), "i32")
    constants = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, HAS_BIAS=True, RELU=False, PDL=pdl)
    return _ptx(gemv_kernels._gemv_kernel, {**pointers, **ints}, constants, 4, 5)


def test_a_dependent_gemv_prefetches_waits_releases_then_reads_x():
    ptx = _gemv_ptx(pdl=True)
    assert sum(WAIT in line for line in ptx) == 1
    assert sum(RELEASE in line for line in ptx) == 1
    wait, release = _first(ptx, re.escape(WAIT)), _first(ptx, re.escape(RELEASE))
    prefetch = _first(ptx, r"prefetch\.global\.L2")
    reads = _first(ptx, r"^\s*(@%p\d+\s+)?(ld\.global|cp\.async)")
    assert prefetch < wait < release < reads


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
    assert wait < release < _first(ptx, r"ld\.global")


def test_only_hopper_gpus_launch_dependently_and_the_switch_turns_it_off(monkeypatch):
    assert not dependent_launch(torch.device("cpu"))
    monkeypatch.setenv(PDL_SWITCH, "0")
    assert not dependent_launch(torch.device("cuda", 0))  # decided before asking the device
