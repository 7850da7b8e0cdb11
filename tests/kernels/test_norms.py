"""The models' norms (energon/kernels/norms.py) and their Triton kernel (norm_kernels.py).

Off CUDA the modules run the eager torch ops, bit for bit what the models computed before (and
RMSNorm bit for bit Hugging Face's LlamaRMSNorm). The kernel is checked against a float64
recomputation: on CPU in Triton's interpreter, compiled on CUDA (the `gpu` tests at the end, also
inside a CUDA graph). The interpreter must be chosen before triton is first imported, and torch
imports triton early, so the interpreted calls go to one spawned worker process that starts with
TRITON_INTERPRET=1: the variable never reaches this test process or any other test. The
interpreter rounds float32 to bfloat16 by truncation (the GPU rounds to nearest even), so bf16 is
checked on CUDA only. Kernel tests skip where triton is not installed.
"""

from __future__ import annotations

import pytest
import torch

from energon.kernels.norms import ENV_SWITCH, LayerNorm, RMSNorm, kernels_for

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (rows, width): decode-sized and prefill-sized row counts; widths that are powers of two, OPT-13b's
# 5120, and ones that are not multiples of 16 (masked tails, unaligned rows).
CASES = [(1, 5120), (67, 100), (2, 4133), (3, 768), (1, 16384), (17, 64)]
KINDS = {  # name -> (rms, has weight, has bias)
    "layer_norm": (False, True, True),
    "layer_norm_no_bias": (False, True, False),
    "layer_norm_no_affine": (False, False, False),
    "rms_norm": (True, True, False),
}
EPS = {False: 1e-5, True: 1e-6}
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# Relative and absolute tolerance on normed rows: about two units in the last place of the dtype
# (the output rounds once; RMSNorm rounds once more before the weight).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=8e-3),
}


def make_inputs(kind, rows, width, dtype, add, device="cpu", seed=0):
    """Random x (a strided view: its rows are wider in memory), residual, weight and bias."""
    rms, has_weight, has_bias = KINDS[kind]
    g = torch.Generator().manual_seed(seed + width + rows)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    x = randn(rows, width + 8)[:, :width]
    return dict(
        x=x,
        residual=randn(rows, width, scale=2.0) if add else None,
        weight=randn(width) if has_weight else None,
        bias=randn(width) if has_bias else None,
        eps=EPS[rms],
        rms=rms,
    )


def reference(x, residual, weight, bias, eps, rms):
    """float64 recomputation: (normed float64, summed in x's dtype). The sum and RMSNorm's cast
    back are rounded to x's dtype where the eager ops round them."""
    summed = x if residual is None else (x.double() + residual.double()).to(x.dtype)
    h = summed.double()
    if rms:
        y = (h / (h.pow(2).mean(-1, keepdim=True) + eps).sqrt()).to(x.dtype).double()
    else:
        centred = h - h.mean(-1, keepdim=True)
        y = centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    if weight is not None:
        y = y * weight.double()
    if bias is not None and not rms:
        y = y + bias.double()
    return y, summed


def assert_matches_reference(normed, summed, inputs):
    x, residual = inputs["x"], inputs["residual"]
    want, _ = reference(**inputs)
    assert normed.dtype == x.dtype and normed.shape == x.shape
    torch.testing.assert_close(normed.cpu().double(), want.cpu(), **TOL[x.dtype])
    if residual is None:
        assert summed is x
    else:  # the sum rounds exactly as eager `x + residual` on the same device
        torch.testing.assert_close(summed, x + residual, rtol=0, atol=0)


def hand_case(name, device="cpu"):
    """(kind, fp16 norm_rows kwargs, normed rows worked out by hand)."""
    if name == "rounded_sum":
        # 2048 + 0.5 and 2048 - 0.5 both round to 2048 in fp16 (the second a tie, to even): the
        # rows are constant and normalise to 0, where the unrounded sum would give +1 and -1.
        kind, x = "layer_norm_no_affine", torch.full((2, 64), 2048.0)
        kwargs = dict(x=x, residual=torch.tensor([0.5, -0.5]).repeat(2, 32), weight=None)
        expected = torch.zeros(2, 64)
    else:  # "cast_order"
        # Row [c, d x 63]: c / rms = 1.54720 and d / rms = 0.98888 round to 1.546875 and
        # 0.98876953125 (HF casts back to fp16 before the weight); times w = 2.1796875 these round
        # to 3.37109375 and 2.154296875. Without the cast back: 3.373046875 and 2.15625.
        kind, (c, d, w) = "rms_norm", (1.951171875, 1.2470703125, 2.1796875)
        kwargs = dict(x=torch.tensor([[c] + [d] * 63]), residual=None, weight=torch.full((64,), w))
        expected = torch.tensor([[3.37109375] + [2.154296875] * 63])
    rms = KINDS[kind][0]
    kwargs = {k: None if v is None else v.to(device, torch.float16) for k, v in kwargs.items()}
    return kind, {**kwargs, "bias": None, "eps": EPS[rms], "rms": rms}, expected.half()


HAND_CASES = ["rounded_sum", "cast_order"]


def module_for(kind, inputs):
    """The model-side module holding `inputs`' weight and bias."""
    width, dtype, device = inputs["x"].shape[-1], inputs["x"].dtype, inputs["x"].device
    rms, has_weight, has_bias = KINDS[kind]
    if rms:
        module = RMSNorm(width, eps=inputs["eps"])
    else:
        module = LayerNorm(width, eps=inputs["eps"], elementwise_affine=has_weight, bias=has_bias)
    module = module.to(device, dtype)
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(module, name, None) is not None:
                getattr(module, name).copy_(inputs[name])
    return module


def run_module(module, inputs):
    """module.add_norm(x, residual)'s normed rows, or module(x) without a residual."""
    if inputs["residual"] is None:
        return module(inputs["x"])
    return module.add_norm(inputs["x"], inputs["residual"])[0]


# --- the eager path (cpu): the torch ops the models used before --------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS)
@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_off_cuda_is_nn_layer_norm_bit_for_bit(dtype, affine, bias):
    ours = LayerNorm(96, eps=1e-5, elementwise_affine=affine, bias=bias)
    theirs = torch.nn.LayerNorm(96, eps=1e-5, elementwise_affine=affine, bias=bias)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape))
    ours.load_state_dict(theirs.state_dict())  # same parameter names
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x, residual = torch.randn(2, 5, 96).to(dtype), torch.randn(2, 5, 96).to(dtype)
    assert torch.equal(ours(x), theirs(x))
    normed, summed = ours.add_norm(x, residual)
    assert torch.equal(summed, x + residual)
    assert torch.equal(normed, theirs(residual + x))  # the models' operand order


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS)
def test_rms_norm_off_cuda_is_transformers_llama_rms_norm_bit_for_bit(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    theirs = LlamaRMSNorm(96, eps=1e-6)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(96))
    ours = RMSNorm(96, eps=1e-6)
    ours.load_state_dict(theirs.state_dict())
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x, residual = torch.randn(7, 96).to(dtype), torch.randn(7, 96).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        normed, summed = ours.add_norm(x, residual)
        assert torch.equal(summed, x + residual)
        assert torch.equal(normed, theirs(residual + x))


def test_cpu_tensors_never_take_the_kernel():
    x, w = torch.randn(2, 64), torch.ones(64)
    assert kernels_for(x, w) is None
    assert kernels_for(x.half(), w.half(), None) is None


@pytest.mark.parametrize("case", HAND_CASES)
def test_eager_modules_give_the_hand_computed_rows(case):
    kind, inputs, expected = hand_case(case)
    assert torch.equal(run_module(module_for(kind, inputs), inputs), expected)


# --- the kernel in Triton's interpreter (cpu) --------------------------------------------------


def _norm_rows(calls):
    """Runs in the interpreter worker: norm_rows on each kwargs of `calls`."""
    from energon.kernels.norm_kernels import norm_rows

    return [norm_rows(**kwargs) for kwargs in calls]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("add", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_interpreted_kernel_equals_float64_reference(triton_interpreter, kind, add, dtype):
    cases = [make_inputs(kind, rows, width, dtype, add) for rows, width in CASES]
    results = triton_interpreter.apply(_norm_rows, (cases,))
    for inputs, (normed, summed) in zip(cases, results, strict=True):
        if not add:  # summed came back through a pipe: a copy of x, not x itself
            assert torch.equal(summed, inputs["x"])
            summed = inputs["x"]
        assert_matches_reference(normed, summed, inputs)


def test_interpreted_kernel_keeps_leading_dims_and_takes_zero_rows(triton_interpreter):
    inputs = make_inputs("rms_norm", 6, 100, torch.float32, add=True)
    inputs["x"], inputs["residual"] = (
        inputs["x"].reshape(2, 3, 100),
        inputs["residual"].view(2, 3, 100),
    )
    empty = make_inputs("layer_norm", 0, 64, torch.float32, add=True)
    (normed, summed), (none, nothing) = triton_interpreter.apply(_norm_rows, ([inputs, empty],))
    assert_matches_reference(normed, summed, inputs)
    assert none.shape == nothing.shape == (0, 64)


@pytest.mark.parametrize("case", HAND_CASES)
def test_interpreted_kernel_gives_the_hand_computed_rows(triton_interpreter, case):
    _, inputs, expected = hand_case(case)
    [(normed, _)] = triton_interpreter.apply(_norm_rows, ([inputs],))
    assert torch.equal(normed, expected)


def test_kernel_refuses_rows_wider_than_its_registers_hold(triton_interpreter):
    inputs = make_inputs("layer_norm", 1, 16385, torch.float32, add=False)
    with pytest.raises(ValueError, match="at most 16384"):
        triton_interpreter.apply(_norm_rows, ([inputs],))


# --- the compiled kernel on the GPU -------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach the Triton kernel (norm_kernels.norm_rows)."""
    from energon.kernels import norm_kernels

    calls = []
    real = norm_kernels.norm_rows

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(norm_kernels, "norm_rows", counted)
    return calls


# Every kind in fp16, the two the models use most in bf16 and fp32 too (each case compiles anew).
CUDA_KINDS = [(kind, torch.float16) for kind in KINDS] + [
    (kind, dtype)
    for kind in ("layer_norm", "rms_norm")
    for dtype in (torch.bfloat16, torch.float32)
]
CUDA_CASES = [(1, 5120), (67, 100), (2, 4133), (256, 768)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind, dtype", CUDA_KINDS, ids=lambda v: str(v).replace("torch.", ""))
def test_cuda_modules_take_the_kernel_and_match_reference_and_eager(kind, dtype, kernel_calls):
    pytest.importorskip("triton")
    for rows, width in CUDA_CASES:
        inputs = make_inputs(kind, rows, width, dtype, add=True, device="cuda")
        module, x, residual = module_for(kind, inputs), inputs["x"], inputs["residual"]
        with torch.inference_mode():
            normed, summed = module.add_norm(x, residual)
            alone = module(x)
            with pytest.MonkeyPatch.context() as env:
                env.setenv(ENV_SWITCH, "0")
                eager_normed, eager_summed = module.add_norm(x, residual)
                eager_alone = module(x)
        assert_matches_reference(normed, summed, inputs)
        assert_matches_reference(alone, x, {**inputs, "residual": None})
        assert torch.equal(summed, eager_summed)
        torch.testing.assert_close(normed, eager_normed, **TOL[dtype])
        torch.testing.assert_close(alone, eager_alone, **TOL[dtype])
    assert len(kernel_calls) == 2 * len(CUDA_CASES)  # the eager calls never reached it


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", HAND_CASES)
def test_cuda_kernel_gives_the_hand_computed_rows(case, kernel_calls):
    pytest.importorskip("triton")
    kind, inputs, expected = hand_case(case, "cuda")
    with torch.inference_mode():
        normed = run_module(module_for(kind, inputs), inputs)
    assert torch.equal(normed.cpu(), expected) and len(kernel_calls) == 1


@pytest.mark.gpu
@needs_cuda
def test_cuda_kernel_replays_inside_a_cuda_graph():
    pytest.importorskip("triton")
    dtype, rows, width = torch.float16, 4, 5120
    ln = module_for("layer_norm", make_inputs("layer_norm", rows, width, dtype, True, "cuda"))
    rms = module_for("rms_norm", make_inputs("rms_norm", rows, width, dtype, True, "cuda"))
    x = torch.zeros(rows, width, dtype=dtype, device="cuda")
    residual = torch.zeros_like(x)

    def step():
        return (*ln.add_norm(x, residual), rms.add_norm(x, residual)[0], ln(x), rms(x))

    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                outputs = step()
        torch.cuda.current_stream().wait_stream(side)
        for seed in (1, 2):
            g = torch.Generator(device="cuda").manual_seed(seed)
            x.copy_(torch.randn(x.shape, generator=g, device="cuda"))
            residual.copy_(torch.randn(x.shape, generator=g, device="cuda"))
            graph.replay()
            expected = step()  # the same kernels, run eagerly on this data
            torch.cuda.synchronize()
            for got, want in zip(outputs, expected, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        with pytest.MonkeyPatch.context() as env:
            env.setenv(ENV_SWITCH, "0")
            eager = step()
        for got, want in zip(outputs, eager, strict=True):
            torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("preset", ["opt-125m", "tiny"])
def test_cuda_fp16_logits_with_the_kernel_are_as_close_to_fp32_as_eager(preset, monkeypatch):
    """A whole model (opt-125m: LayerNorm; tiny: llama RMSNorm), seeded random weights: the
    kernel's rounding differences stay within twice eager fp16's distance from fp32."""
    pytest.importorskip("triton")
    from energon.runner import ModelRunner

    seqs = [[5, 9, 200, 3, 7], [11], [4, 8, 15, 16, 23, 42]]

    def logits(dtype, triton):
        monkeypatch.setenv(ENV_SWITCH, "1" if triton else "0")
        runner = ModelRunner(preset, rank=0, device="cuda", dtype=dtype, seed=0)
        return runner.forward(seqs).float()

    exact = logits("float32", triton=False)
    eager = (logits("float16", triton=False) - exact).abs().max()
    fused = (logits("float16", triton=True) - exact).abs().max()
    assert fused <= 2 * eager + 1e-4, (fused, eager)
