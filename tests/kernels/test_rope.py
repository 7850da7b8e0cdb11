"""Rotary embedding and SwiGLU's silu(gate) * up as Triton kernels (energon/kernels/rope.py and
rope_kernels.py).

The kernels must give what LLaMA's eager ops give: energon's RotaryEmbedding (itself checked
against transformers in tests/models/test_llama.py) and `F.silu(gate) * up`. They run here in
Triton's interpreter on CPU (the `triton_interpreter` worker of tests/conftest.py), against the
eager ops and a float64 recomputation with the eager ops' roundings; the `gpu` tests run them
compiled, bit for bit against the eager ops on the same GPU. Off CUDA nothing takes the kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from energon.kernels.rope import ENV_SWITCH, rotary_kernels_for, silu_mul
from energon.models.llama import RotaryEmbedding
from energon.parallel.packing import BatchMeta

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (tokens, q heads, kv heads, head dim): a decode row, GQA, a head dim whose half is no power of 2
SHAPES = [(1, 8, 8, 128), (37, 8, 2, 64), (5, 3, 1, 80)]
CONFIG = {"rope_theta": 10000.0, "max_position_embeddings": 4096}
# one unit in the last place of values around 4: the tests' activations are a few units wide
ULP = {torch.float32: 5e-7, torch.float16: 4e-3}


def qkv(tokens, heads, kv_heads, dim, dtype, device="cpu", seed=0):
    """q, k, v as the merged q/k/v GEMM leaves them: column slices of one [T, (H+2Hkv)D] buffer,
    viewed [T, heads, D]; and positions anywhere in the context window."""
    g = torch.Generator().manual_seed(seed + tokens * 7 + dim)
    buf = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(device, dtype)
    q, k, v = buf.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    positions = torch.randint(0, 4096, (tokens,), generator=g).to(device)
    return (
        q.view(tokens, heads, dim),
        k.view(tokens, kv_heads, dim),
        v.view(tokens, kv_heads, dim),
        positions,
    )


def eager_rope(q, k, positions):
    """energon's RotaryEmbedding on the eager ops (cpu tensors never take the kernel)."""
    rope = RotaryEmbedding(CONFIG, q.shape[-1])
    meta = BatchMeta.for_prefill([q.shape[0]])
    return rope(q, k, positions, meta)


def float64_rope(x, positions, inv=None):
    """x rotated in float64 with the eager ops' roundings to x's dtype: cos and sin, each product
    and the sum. `inv`: the float32 inverse frequencies (torch's pow on another device may round
    them otherwise: at position 4000 one unit in their last place moves the angle 2e-4)."""
    dim, dtype = x.shape[-1], x.dtype
    if inv is None:
        inv = 1.0 / (CONFIG["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    freqs = positions[:, None].float() * inv  # float32, as the models compute them
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :].double()
    cos, sin = emb.cos().to(dtype).double(), emb.sin().to(dtype).double()
    h = x.double()
    x1, x2 = h.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return ((h * cos).to(dtype).double() + (rotated * sin).to(dtype).double()).to(dtype)


def _rotate(calls):
    """Runs in the interpreter worker: rotate_ on each (q, k, positions, inv_freq); returns the
    rotated q and k and whether they were rotated in place (the buffer of q, k and v)."""
    from energon.kernels.rope_kernels import rotate_

    out = []
    for q, k, v, positions, inv_freq in calls:
        rq, rk = rotate_(q, k, positions, inv_freq)
        out.append((rq.clone(), rk.clone(), rq is q and rk is k, v.clone()))
    return out


def _silu_mul(calls):
    from energon.kernels.rope_kernels import silu_mul as kernel

    return [kernel(gate, up) for gate, up in calls]


def inv_freq(dim):
    return RotaryEmbedding(CONFIG, dim).inv_freq(torch.device("cpu"))


# --- off CUDA -----------------------------------------------------------------------------------


def test_cpu_tensors_never_take_the_kernels():
    q, k, _, positions = qkv(2, 4, 2, 16, torch.float16)
    assert rotary_kernels_for(q, k) is None
    gate, up = torch.randn(3, 40).chunk(2, dim=-1)
    assert torch.equal(silu_mul(gate, up), F.silu(gate) * up)


def test_eager_rope_agrees_with_its_float64_recomputation():
    """The reference itself: the eager fp16 ops are the float64 recomputation's roundings."""
    q, k, _, positions = qkv(9, 4, 2, 64, torch.float16)
    rq, rk = eager_rope(q.float(), k.float(), positions)  # float32 math, then compared loosely
    torch.testing.assert_close(float64_rope(q.float(), positions), rq, rtol=0, atol=2e-5)
    torch.testing.assert_close(float64_rope(k.float(), positions), rk, rtol=0, atol=2e-5)


# --- the kernels in Triton's interpreter (cpu) --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_interpreted_rotary_rotates_q_and_k_in_place_as_the_eager_ops(triton_interpreter, dtype):
    cases = [(*qkv(*shape, dtype), inv_freq(shape[3])) for shape in SHAPES]
    # worked out first: the worker may rotate these very tensors (shared memory)
    wants = [(*eager_rope(q, k, pos), float64_rope(q, pos), v.clone()) for q, k, v, pos, _ in cases]
    results = triton_interpreter.apply(_rotate, (cases,))
    for want, (rq, rk, in_place, v_after) in zip(wants, results, strict=True):
        want_q, want_k, exact_q, v = want
        assert in_place and torch.equal(v_after, v)  # v, between k's heads, untouched
        # cos and sin may differ from torch's cpu ones in the last float32 bit
        torch.testing.assert_close(rq, want_q, rtol=ULP[dtype], atol=ULP[dtype])
        torch.testing.assert_close(rk, want_k, rtol=ULP[dtype], atol=ULP[dtype])
        torch.testing.assert_close(rq, exact_q, rtol=0, atol=ULP[dtype])


def test_interpreted_rotary_at_position_zero_is_the_identity(triton_interpreter):
    q, k, v, _ = qkv(3, 2, 1, 32, torch.float16)
    zeros = torch.zeros(3, dtype=torch.int64)
    want_q, want_k = q.clone(), k.clone()
    [(rq, rk, _, _)] = triton_interpreter.apply(_rotate, ([(q, k, v, zeros, inv_freq(32))],))
    assert torch.equal(rq, want_q) and torch.equal(
        rk, want_k
    )  # cos 0 = 1, sin 0 = 0: nothing rounds


def test_interpreted_rotary_by_a_quarter_turn_swaps_the_halves(triton_interpreter):
    """Hand case: inv_freq all pi/2 (in float32), position 1 turns each pair (x1, x2) into
    (x1 cos - x2 sin, x2 cos + x1 sin) = (-x2, x1) up to cos(pi/2) ~ -4.4e-8."""
    q = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    k = torch.tensor([[[-5.0, 6.0, 0.5, 8.0]]])
    quarter = torch.full((2,), torch.pi / 2)
    one = torch.ones(1, dtype=torch.int64)
    [(rq, rk, _, _)] = triton_interpreter.apply(_rotate, ([(q, k, k, one, quarter)],))
    torch.testing.assert_close(rq, torch.tensor([[[-3.0, -4.0, 1.0, 2.0]]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(rk, torch.tensor([[[-0.5, -8.0, -5.0, 6.0]]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_interpreted_silu_mul_equals_the_eager_ops(triton_interpreter, dtype):
    g = torch.Generator().manual_seed(1)
    cases = []
    for rows, width in [(1, 2048), (7, 1500), (3, 5)]:  # more than one program per row; tails
        merged = (torch.randn(rows, 2 * width, generator=g) * 4).to(dtype)
        cases.append(tuple(merged.chunk(2, dim=-1)))  # strided rows, as merged() gives them
    for (gate, up), got in zip(cases, triton_interpreter.apply(_silu_mul, (cases,)), strict=True):
        assert got.shape == gate.shape and got.is_contiguous()
        want = (F.silu(gate.double()).to(dtype).double() * up.double()).to(dtype)
        torch.testing.assert_close(got, want, rtol=ULP[dtype], atol=ULP[dtype])
        torch.testing.assert_close(got, F.silu(gate) * up, rtol=ULP[dtype], atol=ULP[dtype])


def test_interpreted_silu_mul_hand_case(triton_interpreter):
    """silu(0) = 0, silu(x) -> x for large x, silu(-large) -> 0: rows times up = 3."""
    gate = torch.tensor([[0.0, 20.0, -30.0, 1.0]])
    up = torch.full((1, 4), 3.0)
    [got] = triton_interpreter.apply(_silu_mul, ([(gate, up)],))
    want = torch.tensor([[0.0, 60.0, 0.0, 3.0 / (1.0 + torch.e**-1.0)]])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_kernels_refuse_inputs_that_do_not_pair_before_launching():
    rope_kernels = pytest.importorskip("energon.kernels.rope_kernels")
    with pytest.raises(ValueError, match="do not pair"):
        rope_kernels.rotate_(
            torch.zeros(2, 4, 8), torch.zeros(3, 4, 8), torch.zeros(2), torch.ones(4)
        )
    with pytest.raises(ValueError, match="differ"):
        rope_kernels.silu_mul(torch.zeros(2, 4), torch.zeros(2, 5))


# --- compiled, on the GPU -----------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_rotary_and_silu_mul_equal_the_eager_ops(monkeypatch, dtype):
    """Within one unit in the last place of the eager ops on the same GPU (libdevice's cos, sin
    and exp may round the last float32 bit otherwise than torch's kernels), and as close to the
    float64 recomputation."""
    tol = dict(rtol=0, atol=ULP.get(dtype, 3.2e-2))
    for shape in SHAPES + [(512, 40, 40, 128)]:
        q, k, v, positions = qkv(*shape, dtype, device="cuda")
        inv = RotaryEmbedding(CONFIG, shape[3]).inv_freq(q.device).cpu()
        exact_q = float64_rope(q.cpu(), positions.cpu(), inv)
        monkeypatch.setenv(ENV_SWITCH, "0")
        want_q, want_k = eager_rope(q.clone(), k.clone(), positions)
        monkeypatch.setenv(ENV_SWITCH, "1")
        assert rotary_kernels_for(q, k) is not None
        before_v = v.clone()
        got_q, got_k = eager_rope(q, k, positions)  # the same call, now one kernel in place
        assert got_q.data_ptr() == q.data_ptr() and torch.equal(v, before_v)
        torch.testing.assert_close(got_q, want_q, **tol)
        torch.testing.assert_close(got_k, want_k, **tol)
        torch.testing.assert_close(got_q.cpu(), exact_q, **tol)
        assert (got_q == want_q).float().mean() > 0.99  # last-bit differences only, and rare
    merged = torch.randn(67, 2 * 13824 // 4, device="cuda").to(dtype) * 4
    gate, up = merged.chunk(2, dim=-1)
    got, want = silu_mul(gate, up), F.silu(gate) * up
    rtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 3e-7}[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5)
    if dtype != torch.float32:  # fp32 keeps the last bits where libdevice's exp and torch's differ
        assert (got == want).float().mean() > 0.99


@pytest.mark.gpu
@needs_cuda
def test_cuda_rotary_replays_in_a_graph_with_new_positions():
    q, k, v, positions = qkv(4, 8, 2, 128, torch.float16, device="cuda")
    static_q, static_k, static_pos = q.clone(), k.clone(), positions.clone()
    rope = RotaryEmbedding(CONFIG, 128)
    meta = BatchMeta.for_prefill([4])
    rope.inv_freq(q.device)  # made before capture, as the runner's warm-up step does
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rope(static_q, static_k, static_pos, meta)
    for shift in (1, 1000):
        static_q.copy_(q), static_k.copy_(k), static_pos.copy_(positions + shift)
        graph.replay()
        want_q, want_k = eager_rope(q.cpu().float(), k.cpu().float(), (positions + shift).cpu())
        torch.testing.assert_close(static_q.float().cpu(), want_q, rtol=0, atol=2e-2)
        torch.testing.assert_close(static_k.float().cpu(), want_k, rtol=0, atol=2e-2)
