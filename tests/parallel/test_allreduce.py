"""The tp all-reduce (energon/parallel/allreduce.py, one_shot_setup.py): NCCL / gloo fallback on cpu, and on 2 GPUs
the one-shot path against NCCL, eagerly and replayed from CUDA graphs.

On cpu the one-shot kernels are replaced by gloo stand-ins (`GlooKernels`), so the routing, the
staging, casting and padding around the kernels, and the layers' use of it run in CI.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
from gloo_group import GlooKernels, run_in_gloo_group

from energon.parallel import allreduce, one_shot_setup
from energon.parallel.allreduce import fast_all_reduce, install_all_reduce
from energon.parallel.layers import RowParallelLinear, VocabParallelEmbedding, _all_reduce
from energon.parallel.one_shot_setup import _Vote, enable_fast_all_reduce, set_up_one_shot
from energon.parallel.ranks import run_ranks
from energon.parallel.topology import NO_MULTICAST_ENV, ParallelState, Topology

WORLD = 2


def seeded(rank: int, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Rank `rank`'s message: seeded, so any rank can compute every rank's."""
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(shape, generator=g).to(dtype=dtype, device=device)


def reference_sum(shape, dtype, world: int = WORLD) -> torch.Tensor:
    """The sum of every rank's message in float64, rounded once to `dtype`: what any sum of two
    operands gives."""
    return sum(seeded(r, shape, dtype).double() for r in range(world)).to(dtype)


class FailingKernels(GlooKernels):
    def _sum(self, symm, out):
        raise RuntimeError("one_shot_all_reduce: not implemented for this input")


# --------------------------------------------------------------------------------- cpu (gloo)


def host(t: torch.Tensor) -> tuple[str, list]:
    """(dtype, values) of a result: plain Python, so the spawned rank can exit before the
    parent reads it (tensors would go through shared file descriptors)."""
    return str(t.dtype), t.double().tolist()


def cpu_checks(state: ParallelState) -> dict:
    rank, group = state.rank, state.tp_group
    out = {"enable": enable_fast_all_reduce(state), "installed": fast_all_reduce(state.tp_group)}
    out["enable_f16"] = enable_fast_all_reduce(state, dtype=torch.float16)
    out["fallback"] = host(_all_reduce(seeded(rank, (3, 8)), group))

    vote = _Vote(group, torch.device("cpu"))
    out["vote_all_ok"] = vote("probe", None)
    out["vote_one_fails"] = vote("probe", "boom" if rank == 1 else None)

    fast = GlooKernels(group, max_bytes=64)
    out["probe_order"] = [str(p.dtype) for p in one_shot_setup._probes(fast, rank)]
    install_all_reduce(state, fast)
    messages = {
        "f32_64B": seeded(rank, (16,)),  # at the threshold, 16-byte rows: one kernel
        "f32_68B": seeded(rank, (17,)),  # over it: gloo
        "f32_odd": seeded(rank, (3,)),  # 12 bytes: staged, padded to 16
        "bf16_2d": seeded(rank, (2, 16), torch.bfloat16),  # summed in bf16, one kernel
        "f16": seeded(rank, (5,), torch.float16),  # summed in float32: staged
        "f32_strided": seeded(rank, (4, 4)).t(),  # not contiguous: staged
        "f64": seeded(rank, (4,), torch.float64),  # no kernel for it: gloo
    }
    sums = {}
    for name, m in messages.items():
        before = len(fast.kernels)
        sums[name] = (host(_all_reduce(m, group)), fast.kernels[before:])
    out["sums"] = sums
    out["counts"] = (fast.one_shot_calls, fast.nccl_calls)

    own = GlooKernels(group, max_bytes=64, float16_in_float32=False, own=True)
    install_all_reduce(state, own)
    bias16, bias32 = seeded(5, (4,), torch.float16), seeded(5, (4,))
    out["own"] = {
        "f16_bias": host(_all_reduce(seeded(rank, (2, 4), torch.float16), group, bias16)),
        "f16_strided": host(_all_reduce(seeded(rank, (4, 2), torch.float16).t(), group)),
        "f32_bias": host(_all_reduce(seeded(rank, (2, 4)), group, bias32)),
        "f16_over": host(_all_reduce(seeded(rank, (9, 4), torch.float16), group, bias16)),
    }
    out["own_kernels"] = own.kernels
    out["own_line"] = own.describe()

    no_f16 = GlooKernels(group, max_bytes=64, float16_in_float32=False)
    out["default_f16"] = (no_f16.takes(seeded(rank, (5,), torch.float16)), no_f16.describe())

    failing = FailingKernels(group, max_bytes=64)
    install_all_reduce(state, failing)
    out["after_failure"] = host(_all_reduce(seeded(rank, (3,)), group))
    out["failing"] = (failing.max_bytes, failing.error, failing.nccl_calls, failing.describe())

    install_all_reduce(state, None)
    out["uninstalled"] = (fast_all_reduce(group), group in allreduce._FAST_BY_GROUP)
    return out


def layer_outputs(state: ParallelState) -> dict:
    """A row-parallel linear and a vocab-parallel embedding, with gloo and with GlooKernels."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, 12, generator=g), torch.randn(8, generator=g)
    emb = torch.randn(16, 8, generator=g)
    x, ids = torch.randn(5, 12, generator=g), torch.tensor([0, 7, 8, 15, 3])
    row = RowParallelLinear(12, 8)
    row.weight.data.copy_(w[:, state.tp_rank * 6 : (state.tp_rank + 1) * 6])
    row.bias.data.copy_(b)
    embedding = VocabParallelEmbedding(16, 8)
    embedding.weight.data.copy_(emb[state.tp_rank * 8 : (state.tp_rank + 1) * 8])
    my_x = x[:, state.tp_rank * 6 : (state.tp_rank + 1) * 6].contiguous()
    plain = [host(row(my_x.clone()).sum()), host(embedding(ids))]
    fast = GlooKernels(state.tp_group, max_bytes=1024)
    install_all_reduce(state, fast)
    through_fast = [host(row(my_x.clone()).sum()), host(embedding(ids))]
    install_all_reduce(state, None)
    return {"plain": plain, "fast": through_fast, "one_shot_calls": fast.one_shot_calls}


@pytest.fixture(scope="module")
def cpu_results():
    return run_in_gloo_group(cpu_checks, WORLD, 1)


def test_on_cpu_enabling_keeps_gloo_and_says_why(cpu_results):
    for r in cpu_results:
        assert r["enable"] == "gloo: one-shot needs cuda (device cpu)"
        assert r["enable_f16"] == "gloo: one-shot needs cuda (device cpu)"
        assert r["installed"] is None


def test_the_fallback_equals_the_sum_over_ranks(cpu_results):
    for r in cpu_results:
        assert r["fallback"] == host(reference_sum((3, 8), torch.float32))


def test_a_step_counts_only_when_every_rank_managed_it(cpu_results):
    assert [r["vote_all_ok"] for r in cpu_results] == [None, None]
    assert [r["vote_one_fails"] for r in cpu_results] == [
        "probe failed on tp rank(s) [1]",
        "probe: boom",
    ]


def test_the_set_up_probes_go_in_one_order_on_every_rank(cpu_results):
    """Each rank is its own process, where a set of dtypes iterates in its own order: probing
    in that order made the ranks' one-shot calls pair up wrongly and hang the set-up."""
    want = [str(d) for d in allreduce.SUM_DTYPE for _ in range(2)]
    assert [r["probe_order"] for r in cpu_results] == [want, want]


def test_small_messages_take_the_kernels_and_the_rest_gloo(cpu_results):
    f32, bf16 = torch.float32, torch.bfloat16
    expected_kernels = {
        "f32_64B": [("copy_and_sum", f32, 16)],
        "f32_68B": [],
        "f32_odd": [("sum", f32, 4)],
        "bf16_2d": [("copy_and_sum", bf16, 32)],
        "f16": [("sum", f32, 8)],
        "f32_strided": [("sum", f32, 16)],
        "f64": [],
    }
    for r in cpu_results:
        assert {k: v[1] for k, v in r["sums"].items()} == expected_kernels
        assert r["counts"] == (5, 2)


def test_float16_goes_to_gloo_unless_asked_for(cpu_results):
    for r in cpu_results:
        assert r["default_f16"] == (
            False,
            "one-shot (torch symmetric memory) up to 64 bytes of bfloat16, float32; "
            "nccl for the rest",
        )


def test_float16_takes_energons_kernel_with_the_bias_fused(cpu_results):
    f16 = torch.float16
    bias16, bias32 = seeded(5, (4,), f16).double(), seeded(5, (4,)).double()

    def want(shape, dtype, bias):
        total = sum(seeded(r, shape, dtype).double() for r in range(WORLD))
        return total + bias if bias is not None else total

    for r in cpu_results:
        assert r["own_kernels"] == [
            ("own", f16, 8, True, True),
            ("own", f16, 8, False, True),  # staged: the kernel gets a contiguous copy
            ("copy_and_sum", torch.float32, 8),  # torch's kernel, then the bias added
        ]  # f16_over: 72 bytes, past max_bytes: gloo, then the bias
        assert r["own_line"] == (
            "one-shot (torch symmetric memory) up to 64 bytes of bfloat16, float32, float16 "
            "(float16 by energon's kernel); nccl for the rest"
        )
        got = r["own"]
        assert got["f16_bias"] == host(want((2, 4), f16, bias16).to(f16))
        assert got["f16_strided"] == host(want((4, 2), f16, None).to(f16).t())
        torch.testing.assert_close(
            torch.tensor(got["f32_bias"][1], dtype=torch.float64),
            want((2, 4), torch.float32, bias32),
        )
        torch.testing.assert_close(
            torch.tensor(got["f16_over"][1], dtype=torch.float64),
            want((9, 4), f16, bias16),
            atol=1e-2,
            rtol=1e-3,
        )


def test_every_path_gives_the_sum_over_ranks(cpu_results):
    shapes = {
        "f32_64B": ((16,), torch.float32),
        "f32_68B": ((17,), torch.float32),
        "f32_odd": ((3,), torch.float32),
        "bf16_2d": ((2, 16), torch.bfloat16),
        "f16": ((5,), torch.float16),
        "f32_strided": ((4, 4), torch.float32),
        "f64": ((4,), torch.float64),
    }
    for r in cpu_results:
        for name, (shape, dtype) in shapes.items():
            want = reference_sum(shape, dtype)
            if name == "f32_strided":
                want = want.t()
            assert r["sums"][name][0] == host(want), name


def test_a_kernel_that_refuses_its_input_turns_the_fast_path_off(cpu_results):
    for r in cpu_results:
        assert r["after_failure"] == host(reference_sum((3,), torch.float32))
        max_bytes, error, nccl_calls, line = r["failing"]
        assert (max_bytes, nccl_calls) == (0, 1)
        assert error == "RuntimeError: one_shot_all_reduce: not implemented for this input"
        assert line.startswith("nccl: one-shot turned off after set-up")
        assert r["uninstalled"] == (None, False)


def test_layers_give_the_same_outputs_through_the_fast_path():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, 12, generator=g), torch.randn(8, generator=g)
    emb = torch.randn(16, 8, generator=g)
    x, ids = torch.randn(5, 12, generator=g), torch.tensor([0, 7, 8, 15, 3])
    full = (torch.nn.functional.linear(x, w, b), emb[ids])
    for r in run_in_gloo_group(layer_outputs, WORLD, 1):
        assert r["one_shot_calls"] == 2
        for plain, fast, want in zip(r["plain"], r["fast"], full, strict=True):
            assert plain == fast
            torch.testing.assert_close(torch.tensor(fast[1], dtype=torch.float32), want)


def test_a_check_that_never_finishes_raises_instead_of_hanging(monkeypatch):
    monkeypatch.setattr(one_shot_setup.time, "sleep", lambda s: None)
    clock = iter(range(100))
    monkeypatch.setattr(one_shot_setup.time, "monotonic", lambda: next(clock))
    with pytest.raises(
        one_shot_setup.OneShotStuck, match="did not finish in 5 s.*ENERGON_ALL_REDUCE=nccl"
    ):
        one_shot_setup.wait_until(lambda: False, 5, "the check")
    polls = iter([False, False, True])
    one_shot_setup.wait_until(lambda: next(polls), 5, "the check")  # returns once done
    assert next(polls, None) is None


def test_a_stuck_check_is_not_taken_for_a_failed_step():
    """A failed step falls back to NCCL after a vote; a stuck one cannot vote (the collective
    would queue behind the stuck kernel), so it goes up and start-up fails with its reason."""

    def stuck():
        raise one_shot_setup.OneShotStuck("stuck")

    assert one_shot_setup._attempt(lambda: 1 / 0) == "ZeroDivisionError: division by zero"
    with pytest.raises(one_shot_setup.OneShotStuck):
        one_shot_setup._attempt(stuck)


def test_modes_are_checked_and_tp1_needs_nothing(monkeypatch):
    state = ParallelState()
    with pytest.raises(ValueError, match="ENERGON_ALL_REDUCE must be one of auto, nccl"):
        enable_fast_all_reduce(state, "fast")
    monkeypatch.setenv("ENERGON_ALL_REDUCE", "nvls")
    with pytest.raises(ValueError, match="got 'nvls'"):
        enable_fast_all_reduce(state)
    monkeypatch.setenv("ENERGON_ALL_REDUCE", "nccl")
    assert enable_fast_all_reduce(state) == "none: tp=1"
    assert enable_fast_all_reduce(state, "auto") == "none: tp=1"


# ------------------------------------------------------------------------------ gpu (nccl)


def nccl_sum(x: torch.Tensor, group) -> torch.Tensor:
    y = x.contiguous().clone()  # NCCL wants contiguous tensors
    dist.all_reduce(y, group=group)
    return y


SIZES = [1, 7, 8, 1000, 1001, 5120, 65539]  # elements: odd, aligned, decode-sized, unaligned


def progress(rank: int, step: str) -> None:
    """A line on stderr per step (pytest shows it when the test fails or hangs)."""
    print(f"rank {rank}: {step}", file=sys.stderr, flush=True)


def gpu_checks(state: ParallelState) -> dict:
    """Every gpu check on one rank (collective); plain Python values for the tests below."""
    rank, group, dev = state.rank, state.tp_group, state.device
    progress(rank, "set-up")
    out = {"line": enable_fast_all_reduce(state, "auto")}
    out["env"] = {k: os.environ.get(k) for k in NO_MULTICAST_ENV}
    if fast_all_reduce(group) is None:
        return out
    out["takes_f16"] = fast_all_reduce(group).takes(torch.zeros(8, dtype=torch.float16, device=dev))
    # float16 too (summed in float32), so that every path runs below
    fast, out["line_f16"] = set_up_one_shot(group, dev, float16_in_float32=True)
    install_all_reduce(state, fast)
    out["multicast_ptr"] = getattr(fast.handle, "multicast_ptr", 0)
    progress(rank, "eager sums")
    mismatches = []

    def compare(name, x):
        want = nccl_sum(x, group)
        got = fast(x.clone())
        if not torch.equal(got, want):
            mismatches.append((name, (got.float() - want.float()).abs().max().item()))

    limit = fast.max_bytes
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        size = torch.empty((), dtype=dtype).element_size()
        for n in [*SIZES, limit // size, limit // size + 1]:  # at and over the threshold
            compare(f"{dtype} {n}", seeded(rank, (n,), dtype, dev))
        compare(f"{dtype} 3x5120", seeded(rank, (3, 5120), dtype, dev))
        compare(f"{dtype} strided", seeded(rank, (64, 40), dtype, dev).t())
        compare(f"{dtype} offset", seeded(rank, (2, 5120), dtype, dev)[1])  # 16-byte aligned
        compare(f"{dtype} odd offset", seeded(rank, (2, 5121), dtype, dev)[1])  # not aligned
    out["eager_mismatches"] = mismatches
    out["eager_counts"] = (fast.one_shot_calls, fast.nccl_calls)

    progress(rank, "bias")  # energon's kernel adds a row-parallel layer's bias in its sum
    bias = seeded(7, (5120,), torch.float16, dev)
    out["bias"] = [  # 51 rows: at most max_bytes (one-shot); 64 rows: past it (NCCL)
        (host(fast(seeded(rank, (rows, 5120), torch.float16, dev), bias)), rows)
        for rows in (1, 4, 51, 64)
    ]

    progress(rank, "graph")  # two one-shot sizes and one over the threshold (NCCL in the graph)
    shapes = [((1, 5120), torch.float16), ((4, 5120), torch.bfloat16), ((limit,), torch.float16)]
    static = [torch.zeros(s, dtype=d, device=dev) for s, d in shapes]
    for x in static:  # warm up on a side stream, as the decode graphs do
        fast(x)
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results = [fast(x) for x in static]
    graph_mismatches = []
    for round_ in range(3):
        inputs = [seeded(rank + 10 * round_, s, d, dev) for s, d in shapes]
        for x, v in zip(static, inputs, strict=True):
            x.copy_(v)
        graph.replay()
        for i, (got, v) in enumerate(zip(results, inputs, strict=True)):
            want = nccl_sum(v, group)
            if not torch.equal(got, want):
                graph_mismatches.append((round_, i))
    out["graph_mismatches"] = graph_mismatches

    progress(rank, "fused norm")
    out["fused_norm"] = fused_norm_checks(fast, rank, dev)
    progress(rank, "pushed")
    out["pushed"] = pushed_checks(fast, rank, dev)

    # a row-parallel layer: through energon's kernel, its partial products summed over the
    # ranks and its bias added in float32, rounded once; through NCCL, rounded twice
    progress(rank, "layer")
    row = RowParallelLinear(1024, 512).to(device=dev, dtype=torch.float16)
    row.weight.data.copy_(seeded(rank, (512, 512), torch.float16, dev) / 16)
    row.bias.data.copy_(seeded(7, (512,), torch.float16, dev))
    x = seeded(rank, (4, 512), torch.float16, dev)
    with torch.inference_mode():
        calls = fast.one_shot_calls
        with_fast = row(x).sum()
        out["layer_took_one_shot"] = fast.one_shot_calls == calls + 1
        partial = torch.nn.functional.linear(x, row.weight).float()
        dist.all_reduce(partial, group=group)  # exact: two float16 addends
        once = (partial + row.bias.float()).half()
        install_all_reduce(state, None)
        with_nccl = row(x).sum()
        twice = (partial.half() + row.bias).half()
    out["layer_equal"] = (torch.equal(with_fast, once), torch.equal(with_nccl, twice))
    out["nccl_mode"] = (enable_fast_all_reduce(state, "nccl"), fast_all_reduce(state.tp_group))
    progress(rank, "done")
    return out


def norm_case(rank: int, rows: int, width: int, seed: int, dev) -> dict:
    """A fused all-reduce + norm's arguments: rank `rank`'s partial rows, the rest shared."""
    f16 = torch.float16
    return {
        "x": seeded(rank + seed, (rows, width), f16, dev),
        "bias": seeded(50 + seed, (width,), f16, dev),
        "residual": seeded(60 + seed, (rows, width), f16, dev),
        "weight": seeded(70 + seed, (width,), f16, dev).abs() + 0.5,
        "norm_bias": seeded(80 + seed, (width,), f16, dev),
    }


def fused(fast, case: dict, rms: bool, residual=True, bias=True):
    return fast.add_norm(
        case["x"],
        case["bias"] if bias else None,
        case["residual"] if residual else None,
        case["weight"],
        case["norm_bias"],
        1e-5,
        rms,
    )


def unfused(fast, case: dict, rms: bool, residual=True, bias=True):
    """The one-shot sum, then the add+norm kernel: what the fused kernel must equal."""
    from energon.kernels.norm_kernels import norm_rows

    y = fast(case["x"].clone(), case["bias"] if bias else None)
    res = case["residual"] if residual else None
    normed, summed = norm_rows(y, case["weight"], case["norm_bias"], 1e-5, rms, res)
    return normed, summed if residual else y


def fused_norm_checks(fast, rank: int, dev) -> dict:
    """The fused all-reduce + norm against the one-shot sum then the norm kernel (bit for bit),
    eagerly for several shapes and from a CUDA graph whose calls of 1 and 16 rows follow each
    other; the float64 sums for the tests."""
    out, mismatches, calls = {}, [], fast.norm_calls
    for rows, width in ((1, 5120), (3, 5120), (16, 5120), (48, 5120), (5, 1000), (2, 16384)):
        for rms in (False, True):
            for residual, bias in ((True, True), (False, True), (True, False)):
                case = norm_case(rank, rows, width, rows + width, dev)
                got = fused(fast, case, rms, residual, bias)
                want = unfused(fast, case, rms, residual, bias)
                if got is None or not all(map(torch.equal, got, want)):
                    mismatches.append((rows, width, rms, residual, bias, got is None))
    out["eager_mismatches"] = mismatches
    out["eager_fused_calls"] = fast.norm_calls - calls
    out["refused"] = [  # past 64 rows, and bfloat16: the caller sums and normalises
        fused(fast, norm_case(rank, 65, 512, 0, dev), False) is None,
        fast.add_norm(
            *(t.bfloat16() for t in (norm_case(rank, 2, 512, 0, dev)["x"],)),
            None,
            None,
            None,
            None,
            1e-5,
            False,
        )
        is None,
    ]
    case = norm_case(rank, 4, 5120, 0, dev)
    out["sum_inputs"] = (host(case["x"]), host(case["bias"]), host(case["residual"]))
    out["sum"] = host(fused(fast, case, rms=False)[1])

    shapes = [(1, 5120), (16, 5120), (1, 5120)]
    static = [norm_case(rank, r, w, 0, dev) for r, w in shapes]
    for c in static:  # warm-up, as the decode graphs do
        fused(fast, c, rms=True)
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results = [fused(fast, c, rms=True) for c in static]
    graph_mismatches = []
    for round_ in range(3):
        for i, ((r, w), c) in enumerate(zip(shapes, static, strict=True)):
            for key, value in norm_case(rank, r, w, 100 * round_ + i, dev).items():
                c[key].copy_(value)
        graph.replay()
        for i, (c, got) in enumerate(zip(static, results, strict=True)):
            if not all(map(torch.equal, got, unfused(fast, c, rms=True))):
                graph_mismatches.append((round_, i))
    out["graph_mismatches"] = graph_mismatches
    return out


def pushed_checks(fast, rank: int, dev) -> dict:
    """A row-parallel GEMV that pushes its product (energon/parallel/partial_sum.py) and the
    fused kernel that then only waits for the rows, against the same GEMV unpushed and the
    kernel pushing: equal bits, eagerly (with and without a norm after it) and replayed from a
    CUDA graph. Empty where the pushing GEMV does not run (before Hopper)."""
    from energon.kernels.gemv import linear, pushed_linear

    f16 = torch.float16
    weight = seeded(rank + 30, (5120, 2560), f16, dev) / 64

    def row_parallel(x, case, rms, push):
        if push:
            partial = pushed_linear(x, weight, fast.push_for(x.shape[0], 5120, f16))
            assert partial is not None
        else:
            partial = linear(x, weight, early_weights=True)
        args = (case["bias"], case["residual"], case["weight"], case["norm_bias"], 1e-5, rms)
        return fast.add_norm(partial, *args, pushed=push)

    if pushed_linear(seeded(rank, (1, 2560), f16, dev), weight, None) is None:
        return {}
    out, mismatches, calls = {}, [], fast.push_calls
    for rows in (1, 2):
        x, case = seeded(rank + 40, (rows, 2560), f16, dev), norm_case(rank, rows, 5120, rows, dev)
        for rms in (False, True):
            got, want = (row_parallel(x, case, rms, push) for push in (True, False))
            if not all(map(torch.equal, got, want)):
                mismatches.append((rows, rms))
        pushed = pushed_linear(x, weight, fast.push_for(rows, 5120, f16))
        alone = fast.pushed_sum(pushed, case["bias"])  # no norm after it
        plain = linear(x, weight, early_weights=True)
        want = fast.add_norm(plain, case["bias"], None, None, None, 1e-5, False)[1]
        if not torch.equal(alone, want):
            mismatches.append((rows, "sum"))
    out["eager_mismatches"], out["eager_pushes"] = mismatches, fast.push_calls - calls

    xs = [seeded(rank + 50, (r, 2560), f16, dev) for r in (1, 2, 1)]
    static = [norm_case(rank, x.shape[0], 5120, 0, dev) for x in xs]
    for x, c in zip(xs, static, strict=True):  # warm-up, as the decode graphs do
        row_parallel(x, c, True, True)
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results = [row_parallel(x, c, True, True) for x, c in zip(xs, static, strict=True)]
    graph_mismatches = []
    for round_ in range(3):
        for i, (x, c) in enumerate(zip(xs, static, strict=True)):
            x.copy_(seeded(rank + 100 * round_ + i, x.shape, f16, dev))
            for key, value in norm_case(rank, x.shape[0], 5120, 100 * round_ + i, dev).items():
                c[key].copy_(value)
        graph.replay()
        for i, (x, c, got) in enumerate(zip(xs, static, results, strict=True)):
            if not all(map(torch.equal, got, row_parallel(x, c, True, False))):
                graph_mismatches.append((round_, i))
    out["graph_mismatches"] = graph_mismatches
    return out


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


two_gpus = pytest.mark.skipif(gpus() < 2, reason="needs 2 CUDA GPUs")


@pytest.fixture(scope="module")
def gpu_results():
    """gpu_checks on cuda:0 and cuda:1; a rank that has not answered in 90 s fails the tests
    (with the ranks' progress lines) instead of hanging them."""
    return run_ranks(gpu_checks, Topology(WORLD), "cuda", timeout=90)


@pytest.mark.gpu
@two_gpus
def test_one_shot_is_set_up_on_both_ranks_without_multicast(gpu_results):
    for r in gpu_results:
        assert r["line"] == (
            "one-shot (torch symmetric memory) up to 524288 bytes of bfloat16, float32, "
            "float16 (float16 by energon's kernel, fused with the norm after it); nccl for the rest"
        )
        assert r["takes_f16"] is True
        assert r["line_f16"] == r["line"]
        assert all(r["env"].get(k) == v for k, v in NO_MULTICAST_ENV.items())
        assert r["multicast_ptr"] == 0


@pytest.mark.gpu
@two_gpus
def test_one_shot_equals_nccl_for_every_dtype_and_size(gpu_results):
    for r in gpu_results:
        assert r["eager_mismatches"] == []
        # 3 dtypes x (7 sizes + at the threshold + 4 shapes) one-shot, 3 over the threshold
        assert r["eager_counts"] == (36, 3)


@pytest.mark.gpu
@two_gpus
def test_energons_kernel_adds_the_bias_with_one_rounding_alike_on_every_rank(gpu_results):
    f16, bias = torch.float16, seeded(7, (5120,), torch.float16).double()
    assert gpu_results[0]["bias"] == gpu_results[1]["bias"]  # the same bits on both ranks
    for (dtype, values), rows in gpu_results[0]["bias"]:
        total = sum(seeded(r, (rows, 5120), f16).double() for r in range(WORLD))
        if rows * 5120 * 2 <= 524288:  # energon's kernel: one rounding
            want = (total + bias).to(f16)
        else:  # NCCL's sum, rounded, then the bias added and rounded again
            want = (total.to(f16).double() + bias).to(f16)
        assert dtype == "torch.float16"
        assert torch.equal(torch.tensor(values, dtype=torch.float64), want.double()), rows


@pytest.mark.gpu
@two_gpus
def test_one_shot_replayed_from_a_cuda_graph_equals_nccl(gpu_results):
    for r in gpu_results:
        assert r["graph_mismatches"] == []


@pytest.mark.gpu
@two_gpus
def test_a_row_parallel_layer_rounds_once_through_energons_kernel(gpu_results):
    for r in gpu_results:
        assert r["layer_took_one_shot"]
        assert r["layer_equal"] == (True, True)


@pytest.mark.gpu
@two_gpus
def test_nccl_mode_turns_the_fast_path_off(gpu_results):
    for r in gpu_results:
        assert r["nccl_mode"] == ("nccl: check: ENERGON_ALL_REDUCE=nccl", None)


@pytest.mark.gpu
@two_gpus
def test_the_fused_all_reduce_and_norm_equal_the_sum_then_the_norm(gpu_results):
    """Bit for bit, eagerly (36 cases) and replayed from a CUDA graph; alike on both ranks."""
    for r in gpu_results:
        checks = r["fused_norm"]
        assert checks["eager_mismatches"] == []
        assert checks["eager_fused_calls"] == 36
        assert checks["refused"] == [True, True]
        assert checks["graph_mismatches"] == []
    assert gpu_results[0]["fused_norm"]["sum"] == gpu_results[1]["fused_norm"]["sum"]


@pytest.mark.gpu
@two_gpus
def test_the_fused_sum_is_the_float64_sum_rounded_once_then_the_residual_added(gpu_results):
    f16 = torch.float16
    checks = [r["fused_norm"] for r in gpu_results]
    x = [torch.tensor(c["sum_inputs"][0][1], dtype=torch.float64) for c in checks]
    bias, residual = (torch.tensor(v[1], dtype=torch.float64) for v in checks[0]["sum_inputs"][1:])
    want = ((x[0] + x[1] + bias).to(f16).double() + residual).to(f16).double()
    assert torch.equal(torch.tensor(checks[0]["sum"][1], dtype=torch.float64), want)


@pytest.mark.gpu
@two_gpus
def test_a_gemv_that_pushes_its_product_gives_the_fused_kernel_the_same_sum(gpu_results):
    for r in gpu_results:
        pushed = r["pushed"]
        if torch.cuda.get_device_capability()[0] < 9:
            assert pushed == {}  # the pushing GEMV is Hopper's (gemv_tma.py)
            continue
        assert pushed["eager_mismatches"] == [] and pushed["graph_mismatches"] == []
        assert pushed["eager_pushes"] == 2 * 2 + 2  # with the norms, and summed alone


four_gpus = pytest.mark.skipif(gpus() < 4, reason="needs 4 CUDA GPUs")


def fused_norm_on_every_rank(state: ParallelState) -> dict | None:
    """fused_norm_checks on one rank of a 4-rank tp group (collective)."""
    enable_fast_all_reduce(state, "auto")
    fast = fast_all_reduce(state.tp_group)
    return None if fast is None else fused_norm_checks(fast, state.rank, state.device)


@pytest.mark.gpu
@four_gpus
def test_the_fused_all_reduce_and_norm_at_tp4_equal_the_sum_then_the_norm():
    """Four ranks push into each other's slots: the same bit-for-bit checks as at tp=2."""
    results = run_ranks(fused_norm_on_every_rank, Topology(4), "cuda", timeout=120)
    assert all(checks is not None for checks in results)
    for checks in results:
        assert checks["eager_mismatches"] == []
        assert checks["eager_fused_calls"] == 36
        assert checks["graph_mismatches"] == []
    assert all(checks["sum"] == results[0]["sum"] for checks in results)
