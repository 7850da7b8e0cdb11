"""Greedy generation through the Engine equals Hugging Face `generate`, token for token, for every
family of tests/models/conftest.py at every tp/pp layout.

Each (family, layout) starts its own Engine (a checkpoint folder without tokenizer.json, so
prompts are token ids) and generates for all PROMPTS at once: continuous batching, the paged KV
cache and the non-blocking pipeline all take part. The reference runs each prompt alone in HF.

Starting 28 Engines takes ~1.5 minutes on 2 cores, so a plain run covers llama at every layout
and each other family at one multi-worker layout (every layout appears for several families);
ENERGON_SLOW_TESTS=1 runs the whole table (the runner-level logits of every family at every
layout are checked on every run by tests/models/test_parity.py).
"""

from __future__ import annotations

import asyncio
import os

import pytest
from engine_helpers import (
    CHECKPOINT_MAKERS,
    LAYOUTS,
    assert_greedy_equal,
    hf_greedy,
    hf_processed_greedy,
    one_torch_thread,  # noqa: F401 (autouse)
    reference_sample,
)

from energon import Engine, SamplingParams
from energon.parallel.topology import TIMEOUT_ENV

pytestmark = pytest.mark.timeout(120)

PROMPTS = [[5, 9, 3, 7, 11, 2], [42], [3, 12, 13, 14, 15, 16, 17, 100, 127, 8, 9], [64, 8, 8]]
NEW_TOKENS = [10, 14, 6, 12]


# family -> the multi-worker layout it is checked at on a plain run
DEFAULT_LAYOUT = {
    "mistral": (2, 2),
    "qwen2": (2, 1),
    "gpt2": (1, 2),
    "opt": (2, 1),
    "opt_350m": (1, 2),
    "bloom": (2, 1),
}
FULL = os.environ.get("ENERGON_SLOW_TESTS") == "1"


def cases():
    for family in CHECKPOINT_MAKERS:
        for tp, pp in LAYOUTS:
            plain = family == "llama" or DEFAULT_LAYOUT.get(family) == (tp, pp)
            marks = () if plain else (pytest.mark.slow,)
            if not plain and not FULL:
                marks += (pytest.mark.skip(reason="set ENERGON_SLOW_TESTS=1 for every layout"),)
            yield pytest.param(family, tp, pp, marks=marks, id=f"{family}-tp{tp}pp{pp}")


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """family → (checkpoint folder, [HF greedy Reference per prompt])."""
    out = {}
    for family, maker in CHECKPOINT_MAKERS.items():
        folder = tmp_path_factory.mktemp(family)
        hf = maker(folder)
        refs = [hf_greedy(hf, p, n) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)]
        out[family] = (folder, refs)
    return out


async def greedy(engine: Engine) -> list:
    """The Engine's greedy completions of PROMPTS, NEW_TOKENS each (EOS does not stop them)."""
    return await asyncio.gather(
        *(
            engine.infer(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)
        )
    )


def assert_equal_to_transformers(done: list, refs: list) -> None:
    compared = [assert_greedy_equal(c.token_ids, r) for c, r in zip(done, refs, strict=True)]
    assert sum(compared) >= 0.8 * sum(NEW_TOKENS)  # near-ties cut off little of the comparison


@pytest.mark.parametrize("family,tp,pp", list(cases()))
async def test_greedy_generation_equals_transformers(references, family, tp, pp):
    folder, refs = references[family]
    async with Engine(str(folder), tp=tp, pp=pp, device="cpu") as engine:
        done = await greedy(engine)
    assert_equal_to_transformers(done, refs)
    for c, n in zip(done, NEW_TOKENS, strict=True):
        assert (c.finish_reason, len(c.token_ids), c.text) == ("length", n, "")


@pytest.mark.parametrize("tp", [1, 2])
async def test_greedy_tokens_out_of_the_decode_graph_equal_transformers(references, tp):
    """With decode graphs (their static path on cpu), a step whose rows are all plain greedy
    takes its tokens from the graph's argmax on every tp rank, and the next step (lookahead)
    feeds them without a broadcast; a drawn request beside them still goes to the Sampler."""
    folder, refs = references["opt"]
    hf = CHECKPOINT_MAKERS["opt"](folder.parent / f"opt-again-{tp}")  # the same seed: same model
    drawn = SamplingParams(max_tokens=16, temperature=1.0, seed=3, ignore_eos=True)  # outlasts them
    async with Engine(str(folder), tp=tp, device="cpu", decode_graphs="static") as engine:
        done = await greedy(engine)
        infos = await engine.group.broadcast("info")
        sampled = await asyncio.gather(engine.infer(PROMPTS[0], drawn), greedy(engine))
        after = await engine.group.broadcast("info")
    assert_equal_to_transformers(done, refs)
    assert_equal_to_transformers(sampled[1], refs)
    assert sampled[0].token_ids == reference_sample(hf, PROMPTS[0], drawn)
    # every rank took the graph's tokens, for as many steps, and chained steps fed them
    assert len({i["graph_greedy_steps"] for i in infos}) == 1
    assert infos[0]["graph_greedy_steps"] >= max(NEW_TOKENS) - 2
    assert all(i["chained_steps"] > 0 for i in infos)
    # beside a drawn row (it outlasts the greedy ones) no step takes the graph's tokens
    assert all(
        a["graph_greedy_steps"] == i["graph_greedy_steps"]
        for a, i in zip(after, infos, strict=True)
    )


def gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cuda_layouts():
    """(family, tp, pp) on GPUs, each skipped where fewer cards than tp * pp are visible."""
    for family, tp, pp in [
        ("opt", 1, 1),
        ("llama", 2, 1),
        ("mistral", 1, 2),
        ("opt", 2, 1),
        ("llama", 2, 2),
    ]:
        need = pytest.mark.skipif(gpus() < tp * pp, reason=f"needs {tp * pp} CUDA devices")
        yield pytest.param(family, tp, pp, marks=need, id=f"{family}-tp{tp}pp{pp}")


@pytest.mark.gpu
@pytest.mark.parametrize("family,tp,pp", list(cuda_layouts()))
@pytest.mark.parametrize("decode_graphs", ["auto", "off"])
async def test_cuda_engine_with_and_without_decode_graphs_equals_transformers(
    references, family, tp, pp, decode_graphs
):
    """On GPUs "auto" captures decode graphs (NCCL all-reduces inside them at tp=2; the stage
    send/receive outside them at pp=2; at tp=2 x pp=2 the last stage hands the sampled tokens
    back to the first stage's tp rank 0, which broadcasts them over its tp group); float32 keeps
    the comparison with HF exact enough."""
    folder, refs = references[family]
    engine = Engine(
        str(folder), tp=tp, pp=pp, device="cuda", dtype="float32", decode_graphs=decode_graphs
    )
    async with engine:
        done = await greedy(engine)
        infos = await engine.group.broadcast("info")
    want = "capture" if decode_graphs == "auto" else "off"
    assert all(i["decode_graphs"] == want and i["graph_error"] is None for i in infos)
    assert all(i["cpu_threads"] == 1 for i in infos)  # a GPU worker's host work is small ops
    assert all(i["graph_steps"] > 0 for i in infos) == (want == "capture")
    assert_equal_to_transformers(done, refs)


async def switched_runs(monkeypatch, switch_env: str, folder, **engine_args) -> dict:
    """switch value ("1", "0") -> ([(token ids, logprobs) per prompt], workers' infos): greedy
    float16 generation of PROMPTS on CUDA with decode graphs, `switch_env` set to each value."""
    runs = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(switch_env, switch)
        async with Engine(str(folder), device="cuda", dtype="float16", **engine_args) as engine:
            done = await asyncio.gather(
                *(
                    engine.infer(
                        p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=2)
                    )
                    for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)
                )
            )
            infos = await engine.group.broadcast("info")
        assert all(i["graph_steps"] > 0 and i["graph_error"] is None for i in infos)
        runs[switch] = ([(c.token_ids, c.logprobs) for c in done], infos)
    return runs


@pytest.mark.gpu
@pytest.mark.skipif(gpus() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("family", ["llama", "opt"])
async def test_cuda_float16_tp2_sums_into_the_norms_with_nothing_changed(
    references, family, monkeypatch
):
    """float16 at tp=2: the one-shot all-reduce sums each row-parallel output inside the norm
    after it (one kernel, decode graphs and eager prefill alike); ENERGON_ALL_REDUCE_NORM=0
    runs the sum and then the norm as two kernels. Both round alike, so tokens and logprobs
    agree bit for bit."""
    from energon.parallel.allreduce import NORM_ENV

    runs = await switched_runs(monkeypatch, NORM_ENV, references[family][0], tp=2)
    fused_calls = [i["one_shot_calls"][1] for i in runs["1"][1]]
    assert all(n > 0 for n in fused_calls), fused_calls
    assert all(i["one_shot_calls"][1] == 0 and i["one_shot_calls"][0] > 0 for i in runs["0"][1])
    assert runs["1"][0] == runs["0"][0]


@pytest.mark.gpu
@pytest.mark.skipif(gpus() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("family", ["llama", "opt"])
async def test_cuda_float16_tp2_gemvs_push_their_products_with_nothing_changed(
    references, family, monkeypatch
):
    """float16 at tp=2 on Hopper: a row-parallel GEMV pushes its product into every rank's
    slots of the fused all-reduce + norm as its tiles end, and that kernel only waits for the
    rows (energon/parallel/partial_sum.py); ENERGON_ALL_REDUCE_PUSH=0 leaves the push to the
    kernel. The same sums, so tokens and logprobs agree bit for bit."""
    from energon.parallel.allreduce import PUSH_ENV

    runs = await switched_runs(monkeypatch, PUSH_ENV, references[family][0], tp=2)
    assert all(i["one_shot_calls"][2] > 0 for i in runs["1"][1]), runs["1"][1]
    assert all(i["one_shot_calls"][2] == 0 for i in runs["0"][1])
    assert all(i["one_shot_calls"][1] > 0 for i in runs["0"][1])
    assert runs["1"][0] == runs["0"][0]


@pytest.mark.gpu
@pytest.mark.skipif(gpus() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("family", ["llama", "opt"])
async def test_cuda_float16_tp2_streams_weights_early_with_the_same_tokens(
    references, family, monkeypatch
):
    """float16 at tp=2 on Hopper: a decode step's GEMVs run on the Gluon kernel that streams
    its weights before the kernel before it ends (energon/kernels/gemv_tma.py);
    ENERGON_GEMV_TMA=0 keeps them on the Triton GEMV. Both sum in float32 in another order:
    the tokens agree, the logprobs within float16 rounding."""
    import torch

    from energon.kernels.gemv import TMA_SWITCH

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA and dependent launches need sm_90")
    runs = await switched_runs(monkeypatch, TMA_SWITCH, references[family][0], tp=2)
    assert all(i["early_weight_gemvs"] > 0 for i in runs["1"][1])
    assert all(i["early_weight_gemvs"] == 0 for i in runs["0"][1])
    (early, _), (plain, _) = runs["1"], runs["0"]
    assert [tokens for tokens, _ in early] == [tokens for tokens, _ in plain]
    for (_, ours), (_, theirs) in zip(early, plain, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            assert abs(a.logprob - b.logprob) < 0.05, (a, b)


@pytest.mark.gpu
@pytest.mark.skipif(gpus() < 1, reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["llama", "opt"])
async def test_cuda_float16_dependent_launches_change_nothing(references, family, monkeypatch):
    """float16 decode steps run every Triton kernel as a programmatic dependent launch (each
    may start before the kernel before it ends; energon/kernels/chain.py), in the decode graphs
    too; with ENERGON_PDL=0 every launch waits for the one before. Same kernels, same bits:
    tokens and logprobs agree exactly."""
    from energon.kernels import PDL_SWITCH

    runs = await switched_runs(monkeypatch, PDL_SWITCH, references[family][0])
    assert runs["1"][0] == runs["0"][0]


@pytest.mark.gpu
@pytest.mark.skipif(gpus() < 2, reason="needs 2 CUDA devices")
async def test_cuda_pipeline_engine_idles_past_the_collective_timeout(references, monkeypatch):
    """At pp=2 the last stage sends each step's sampled tokens to the first stage, which posts
    the receive only when a later step takes them. An idle Engine has the first stage receive
    the ones no step took; a send left waiting past the timeout would have NCCL's watchdog end
    the last stage's worker."""
    monkeypatch.setenv(TIMEOUT_ENV, "8")  # the workers inherit it
    folder, refs = references["opt"]
    async with Engine(str(folder), pp=2, device="cuda", dtype="float32") as engine:
        for _ in range(2):
            assert_equal_to_transformers(await greedy(engine), refs)
            await asyncio.sleep(20)  # idle for longer than the timeout
        infos = await engine.group.broadcast("info")
        assert engine.recovery.restarts == 0
    assert infos[0]["chained_steps"] > 0 and infos[0]["returns_pending"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(gpus() < 1, reason="needs a CUDA device")
async def test_cuda_penalties_and_logit_bias_equal_transformers_processors(tmp_path):
    """Penalised and biased requests beside plain ones on cuda (decode graphs, lookahead): the
    sampling rank's device-side token tables against transformers' processors on cpu."""
    hf = CHECKPOINT_MAKERS["llama"](tmp_path)
    rules = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(
            max_tokens=12, temperature=0.0, ignore_eos=True, frequency_penalty=0.8,
            presence_penalty=0.4, logit_bias={7: 0.05, 9: -100},
        ),
    ]  # fmt: skip
    refs = [hf_processed_greedy(hf, p, r) for p in PROMPTS[:2] for r in rules]
    async with Engine(str(tmp_path), device="cuda", dtype="float32") as engine:
        done = await asyncio.gather(
            *(engine.infer(p, r) for p in PROMPTS[:2] for r in rules),
            *(engine.infer(p, SamplingParams(max_tokens=n, temperature=0)) for p, n in
              zip(PROMPTS, NEW_TOKENS, strict=True)),
        )  # fmt: skip
        infos = await engine.group.broadcast("info")
    assert infos[0]["graph_steps"] > 0 and infos[0]["graph_error"] is None
    for got, ref in zip(done, refs, strict=False):
        assert assert_greedy_equal(got.token_ids, ref) >= 6
