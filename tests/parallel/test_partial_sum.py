"""A row-parallel layer's PartialSum (energon/parallel/partial_sum.py) on 2 gloo ranks: its sum,
`+` either way, and the norms' `add_norm` taking it, through the fused all-reduce + norm where
the group's fast path has one (a gloo stand-in of the kernel's arithmetic here; the kernel
itself runs in the gpu tests of test_allreduce.py) and summing it first where not."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from gloo_group import GlooKernels, run_in_gloo_group

from energon.kernels.norms import LayerNorm, RMSNorm, rms_norm
from energon.parallel.allreduce import NORM_ENV, PUSH_ENV, install_all_reduce
from energon.parallel.layers import RowParallelLinear
from energon.parallel.partial_sum import summed

WORLD, IN, OUT, ROWS = 2, 12, 8, 3


def weights(dtype):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(OUT, IN, generator=g), torch.randn(OUT, generator=g)
    x, residual = torch.randn(ROWS, IN, generator=g), torch.randn(ROWS, OUT, generator=g)
    norm_w, norm_b = torch.rand(OUT, generator=g) + 0.5, torch.randn(OUT, generator=g)
    return [t.to(dtype) for t in (w, b, x, residual, norm_w, norm_b)]


def layer(state, dtype):
    w, b, x, *_ = weights(dtype)
    half = IN // WORLD
    row = RowParallelLinear(IN, OUT).to(dtype)
    row.weight.data.copy_(w[:, state.tp_rank * half : (state.tp_rank + 1) * half])
    row.bias.data.copy_(b)
    return row, x[:, state.tp_rank * half : (state.tp_rank + 1) * half].contiguous()


def norms(dtype):
    *_, norm_w, norm_b = weights(dtype)
    ln, rms = LayerNorm(OUT).to(dtype), RMSNorm(OUT, 1e-6).to(dtype)
    ln.weight.data.copy_(norm_w)
    ln.bias.data.copy_(norm_b)
    rms.weight.data.copy_(norm_w)
    return ln, rms


def plain_group(state) -> dict:
    """No fast path (gloo): sums, `+`, add_norm summing first."""
    torch.set_grad_enabled(False)
    row, x = layer(state, torch.float32)
    _, _, _, residual, *_ = weights(torch.float32)
    ln, rms = norms(torch.float32)
    p = row(x)
    first, again = p.sum(), p.sum()
    out = {
        "type": type(p).__name__,
        "shape": tuple(p.shape),
        "summed_once": first is again,
        "sum": first,
        "left_add": row(x) + residual,
        "right_add": residual + row(x),
        "summed_tensor": summed(residual) is residual,
        "ln": ln.add_norm(row(x), residual),
        "rms": rms.add_norm(row(x), residual),
        "no_residual": ln.add_norm(row(x), None),
    }
    return out


def test_a_partial_sum_sums_once_and_adds_either_way():
    w, b, x, residual, *_ = weights(torch.float32)
    full = F.linear(x, w, b)
    for r in run_in_gloo_group(plain_group, WORLD):
        assert (r["type"], r["shape"], r["summed_once"], r["summed_tensor"]) == (
            "PartialSum",
            (ROWS, OUT),
            True,
            True,
        )
        torch.testing.assert_close(r["sum"], full)
        torch.testing.assert_close(r["left_add"], full + residual)
        torch.testing.assert_close(r["right_add"], full + residual)


def test_norms_sum_a_partial_sum_first_without_a_fused_path():
    w, b, x, residual, norm_w, norm_b = weights(torch.float32)
    full = F.linear(x, w, b)
    want_ln = F.layer_norm(full + residual, (OUT,), norm_w, norm_b, 1e-5)
    want_rms = rms_norm(full + residual, norm_w, 1e-6)
    for r in run_in_gloo_group(plain_group, WORLD):
        torch.testing.assert_close(r["ln"][0], want_ln)
        torch.testing.assert_close(r["ln"][1], full + residual)
        torch.testing.assert_close(r["rms"][0], want_rms)
        torch.testing.assert_close(r["no_residual"][0], F.layer_norm(full, (OUT,), norm_w, norm_b))
        torch.testing.assert_close(r["no_residual"][1], full)


def with_fused_norm(state):
    """float16 layers and norms on a fast path with the fused all-reduce + norm (gloo standing
    in for the kernel): row, x, residual, ln, rms, the fast path."""
    torch.set_grad_enabled(False)
    f16 = torch.float16
    row, x = layer(state, f16)
    _, _, _, residual, *_ = weights(f16)
    ln, rms = norms(f16)
    fast = GlooKernels(state.tp_group, max_bytes=4096, norm=True)
    install_all_reduce(state, fast)
    return row, x, residual, ln, rms, fast


def fused_group(state) -> dict:
    """A fast path with the fused all-reduce + norm: which calls take it, with which
    arguments, and with ENERGON_ALL_REDUCE_NORM=0."""
    row, x, residual, ln, rms, fast = with_fused_norm(state)
    out = {
        "ln": ln.add_norm(row(x), residual),
        "rms": rms.add_norm(row(x), residual),
        "no_residual": ln.add_norm(row(x), None),
        "wide": ln.add_norm(row(x.repeat(30, 1)), residual.repeat(30, 1)),  # 90 rows: > 64
    }
    out["kernels"] = list(fast.kernels)
    out["counts"] = (fast.one_shot_calls, fast.norm_calls)
    out["line"] = fast.describe()
    os.environ[NORM_ENV] = "0"
    fast.kernels.clear()
    out["switched_off"] = ln.add_norm(row(x), residual)
    out["kernels_off"] = list(fast.kernels)
    out["line_off"] = fast.describe()
    del os.environ[NORM_ENV]
    install_all_reduce(state, None)
    return out


def test_the_norms_hand_a_partial_sum_to_the_fused_all_reduce():
    f16 = torch.float16
    w16, b16, x16, *_ = weights(f16)
    half = IN // WORLD
    partials = [  # each rank's float16 product, as the rank computes it
        F.linear(x16[:, r * half : (r + 1) * half], w16[:, r * half : (r + 1) * half])
        for r in range(WORLD)
    ]
    w, b, x, residual, norm_w, norm_b = (t.double() for t in weights(f16))
    full = sum(p.double() for p in partials) + b  # the fused sum rounds once, the residual add once
    with_residual = (full.to(f16).double() + residual).to(f16)
    results = run_in_gloo_group(fused_group, WORLD)
    for r in results:
        assert r["kernels"] == [
            ("add_norm", f16, ROWS * OUT, True, False, False),
            ("add_norm", f16, ROWS * OUT, True, True, False),
            ("add_norm", f16, ROWS * OUT, True, False, False),
            ("own", f16, 90 * OUT, True, True),  # past 64 rows: the one-shot sum, then the norm
        ]
        assert r["counts"] == (4, 3)
        assert torch.equal(r["ln"][1], with_residual)
        torch.testing.assert_close(
            r["ln"][0].double(),
            F.layer_norm(with_residual.double(), (OUT,), norm_w, norm_b, 1e-5),
            atol=4e-3,
            rtol=4e-3,
        )
        assert torch.equal(r["no_residual"][1], full.to(f16))
        torch.testing.assert_close(r["rms"][0], rms_norm(with_residual, norm_w.to(f16), 1e-6))
        assert torch.equal(r["wide"][1], (full.to(f16).double() + residual).to(f16).repeat(30, 1))
        assert r["line"].endswith(
            "(float16 by energon's kernel, fused with the norm after it); nccl for the rest"
        )
        assert "the norm after it apart: ENERGON_ALL_REDUCE_NORM=0)" in r["line_off"]
        # switched off: the one-shot sum, then the norm's own kernel (eager here)
        assert r["kernels_off"] == [("own", f16, ROWS * OUT, True, True)]
        assert torch.equal(r["switched_off"][1], with_residual)
    assert torch.equal(results[0]["ln"][0], results[1]["ln"][0])


def pushed_group(state) -> dict:
    """As `fused_group`, with GEMVs that push their product (gloo's stand-in keeps it for the
    fused kernel, energon/parallel/partial_sum.py): which kernel sums each product, whether
    each pushed product was taken, and with ENERGON_ALL_REDUCE_PUSH=0."""
    from energon.parallel import layers

    row, x, residual, ln, _, fast = with_fused_norm(state)
    layers.pushed_linear = fast.pushing_linear  # this process is the test's own
    out = {
        "ln": ln.add_norm(row(x), residual),
        "sum": row(x).sum(),  # no norm after it: the fused kernel's sum of the pushed rows
        "plus": residual + row(x),
        "wide": ln.add_norm(row(x.repeat(30, 1)), residual.repeat(30, 1)),  # not pushed
    }
    taken = row(x)
    ln.add_norm(taken, residual)
    out["again"] = taken.sum()  # the push is spent: the all-reduce sums it (no wait for good)
    out["kernels"], out["left"] = list(fast.kernels), len(fast.pushed)
    out["counts"] = (fast.one_shot_calls, fast.norm_calls, fast.push_calls)
    os.environ[PUSH_ENV] = "0"
    fast.kernels.clear()
    out["push_off"] = ln.add_norm(row(x), residual)
    out["kernels_off"] = list(fast.kernels)
    del os.environ[PUSH_ENV]
    install_all_reduce(state, None)
    return out


def test_a_pushed_product_is_summed_by_the_fused_kernel_whoever_takes_it():
    f16 = torch.float16
    reference = run_in_gloo_group(fused_group, WORLD)[0]
    results = run_in_gloo_group(pushed_group, WORLD)
    n = ROWS * OUT
    for r in results:
        assert r["kernels"] == [
            ("add_norm", f16, n, True, False, True),  # the norm after it
            ("add_norm", f16, n, True, False, True),  # sum(): the same kernel, its sum kept
            ("add_norm", f16, n, True, False, True),  # `+`
            ("own", f16, 90 * OUT, True, True),  # past 64 rows: nothing pushed
            ("add_norm", f16, n, True, False, True),
            ("own", f16, n, True, True),  # its partial summed again, by the one-shot kernel
        ]
        assert r["left"] == 0  # every push was taken, once
        assert r["counts"] == (6, 2, 4)
        assert torch.equal(r["again"], reference["no_residual"][1])
        assert all(map(torch.equal, r["ln"], reference["ln"]))
        assert torch.equal(r["sum"], reference["no_residual"][1])
        assert torch.equal(r["plus"], reference["ln"][1])
        assert torch.equal(r["wide"][1], reference["wide"][1])
        assert r["kernels_off"] == [("add_norm", f16, n, True, False, False)]
        assert all(map(torch.equal, r["push_off"], reference["ln"]))
