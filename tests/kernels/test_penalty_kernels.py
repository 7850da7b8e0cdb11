"""The penalties kernel (energon/kernels/penalty_kernels.py) gives what Penalties' eager ops give,
bit for bit, and what float64 math gives.

The kernel runs in Triton's interpreter on CPU (the `triton_interpreter` worker of
tests/conftest.py) inside a real `Penalties`, through steps that start sequences from a history,
append drawn tokens, leave rows out, release and restart a sequence, with repeated ids in prompts
and outputs, bias ids past the vocabulary and phases longer than one block. The `gpu` test runs
it compiled, inside the Sampler, against the same steps on CPU.
"""

from __future__ import annotations

import functools
import types
from collections import Counter

import pytest
import torch

from energon.penalties import Penalties
from energon.sampling import SamplingParams

VOCAB = 300


def row(seq: int, history=None, prompt=None, **kwargs) -> dict:
    """A row's wire params as step.py sends them (the bias only with a history)."""
    wire = {**SamplingParams(temperature=0, **kwargs).to_wire(), "seq": seq}
    if history is None:
        wire.pop("bias_ids", None)
        wire.pop("bias_values", None)
    else:
        wire["history"] = history
        if prompt is not None:
            wire["prompt"] = prompt
    return wire


RULES = {
    1: dict(repetition_penalty=1.3),
    2: dict(frequency_penalty=0.7, presence_penalty=0.4),
    3: dict(logit_bias={5: 2.0, 9: -1.5, VOCAB + 10: 3.0}),
    4: dict(repetition_penalty=0.8, frequency_penalty=-0.3, presence_penalty=1.1, logit_bias={7: 4.0}),
}  # fmt: skip


def steps() -> list[tuple[list[dict | None], list[int]]]:
    """Per step: each logits row's params (None: a row without penalties) and the sequences
    released before it."""
    g = torch.Generator().manual_seed(3)

    def ids(n: int) -> list[int]:  # with repeats: drawn from a quarter of the vocabulary
        return torch.randint(0, VOCAB // 4, (n,), generator=g).tolist()

    histories = {1: ids(37), 2: ids(45), 3: [], 4: ids(21)}
    prompts = {1: ids(50) + [VOCAB + 1], 2: ids(5), 3: ids(3), 4: ids(33)}
    first = [None] + [row(s, histories[s], prompts[s], **RULES[s]) for s in (1, 2, 3, 4)] + [None]
    later = [None] + [row(s, **RULES[s]) for s in (1, 2, 3, 4)] + [None]
    some = [row(4, **RULES[4]), None, row(2, **RULES[2])]  # rows left out, out of slot order
    restart = [row(2, ids(9), ids(70), **RULES[4]), row(1, **RULES[1])]  # new rules for seq 2
    return [(first, []), (later, []), (some, []), (later, []), (restart, [2]), (restart[1:], [])]


def run(kernels, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's (scores, logits) on the cpu through a Penalties on `device` (with `kernels`
    in place of the eager ops when given; on cuda, its own choice), the argmax of the scores
    counted as the drawn tokens."""
    table = Penalties(torch.device(device), kernels=kernels)
    g = torch.Generator().manual_seed(5)
    out = []
    for params, released in steps():
        table.release(released)
        logits = torch.randn(len(params), VOCAB, generator=g) * 3
        wire = [{**SamplingParams(temperature=0).to_wire()} if p is None else p for p in params]
        scores = table.apply(logits.to(device), wire)
        table.count(scores.argmax(dim=-1))
        out.append((scores.cpu(), logits))
    return out


def _interpreted(block: int):
    """Runs in the interpreter worker: `run` with the kernel, `block` ids a phase at once."""
    from energon.kernels import penalty_kernels

    penalise = functools.partial(penalty_kernels.penalise, block=block)
    return run(types.SimpleNamespace(penalise=penalise))


def reference(logits: torch.Tensor, prompt: list[int], output: list[int], rules: dict):
    """One row by float64 math: bias, repetition over prompt and output, then frequency and
    presence over the output."""
    x = logits.double().clone()
    for t, b in rules.get("logit_bias", {}).items():
        if t < VOCAB:
            x[t] += b
    r = rules.get("repetition_penalty", 1.0)
    for t in {t for t in prompt + output if t < VOCAB}:
        x[t] = x[t] * r if x[t] < 0 else x[t] / r
    for t, c in Counter(output).items():
        x[t] -= rules.get("frequency_penalty", 0.0) * c + rules.get("presence_penalty", 0.0)
    return x


@pytest.mark.parametrize("block", [16, 256], ids=["phases-of-many-blocks", "one-block"])
def test_interpreted_kernel_equals_the_eager_ops_bit_for_bit(triton_interpreter, block):
    eager = run(None)
    interpreted = triton_interpreter.apply(_interpreted, (block,))
    assert len(interpreted) == len(eager)
    for (got, logits), (want, same_logits) in zip(interpreted, eager, strict=True):
        assert torch.equal(logits, same_logits)
        assert torch.equal(got, want)


def test_the_eager_ops_equal_float64_math():
    """The reference the kernel is held to above, checked against float64 step by step: each
    sequence's prompt and the tokens drawn for it (argmax of its scores) are tracked here."""
    prompts, outputs, rules = {}, {}, {}
    for (params, released), (scores, logits) in zip(steps(), run(None), strict=True):
        for seq in released:
            outputs.pop(seq)
        for i, p in enumerate(params):
            if p is None:
                assert torch.equal(scores[i], logits[i])
                continue
            seq = p["seq"]
            if "history" in p:
                prompts[seq], outputs[seq] = p.get("prompt", []), list(p["history"])
                rules[seq] = next(
                    r for r in RULES.values() if SamplingParams(temperature=0, **r).to_wire()
                    .items() <= p.items()
                )  # fmt: skip
            want = reference(logits[i], prompts[seq], outputs[seq], rules[seq])
            assert torch.allclose(scores[i].double(), want, rtol=1e-6, atol=1e-6)
            outputs[seq].append(int(scores[i].argmax()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_kernel_equals_the_eager_ops_on_cpu_bit_for_bit():
    from energon.kernels import triton_kernels_for
    from energon.penalties import ENV_SWITCH

    assert triton_kernels_for("penalty_kernels", ENV_SWITCH, torch.zeros(1, device="cuda"))
    for (got, _), (want, _) in zip(run(None, "cuda"), run(None), strict=True):
        assert torch.equal(got, want)
