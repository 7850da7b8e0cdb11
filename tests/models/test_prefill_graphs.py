"""Prefill graphs (energon/prefill_graphs.py): the static-buffer path a CUDA graph replays for
one new prompt.

On cpu the same path runs eagerly ("static"): the pad sequence, the scratch block and the
buffers are all exercised; only the capture itself needs a GPU (the `gpu` test at the end).
"""

import pytest
import torch
from conftest import CHECKPOINT_MAKERS, hf_logits, make_llama, make_opt, make_qwen2

from energon.parallel.attention import Attention
from energon.runner import ModelRunner

BLOCK = 4
# below a bucket, exactly one (the pad sequence is empty), just above one
LENGTHS = [5, 16, 17]


def prompt(length: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed + length)
    return torch.randint(0, 128, (length,), generator=g).tolist()


def prefill_then_decode(tokens: list[int], next_token: int, width: int | None = None) -> list:
    """A one-prompt prefill step (blocks owned in reverse order, so a wrong table shows), then
    one decode step of the same sequence; the tables as the step message carries them."""
    blocks = -(-(len(tokens) + 1) // BLOCK)
    row = list(range(blocks))[::-1] + [-1] * ((width or blocks) - blocks)
    table = torch.tensor([row], dtype=torch.int32)
    return [
        {
            "input_ids": torch.tensor(tokens),
            "query_lens": [len(tokens)],
            "context_lens": [len(tokens)],
            "block_tables": table,
        },
        {
            "input_ids": torch.tensor([next_token]),
            "query_lens": [1],
            "context_lens": [len(tokens) + 1],
            "block_tables": table,
        },
    ]


def caches(runner):
    return [m.kv_cache for m in runner.model.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("family", list(CHECKPOINT_MAKERS))
def test_a_graphed_prefill_equals_transformers_and_the_eager_path(tmp_path, family):
    hf = CHECKPOINT_MAKERS[family](tmp_path)
    static = ModelRunner(str(tmp_path), rank=0, decode_graphs="static")
    eager = ModelRunner(str(tmp_path), rank=0, decode_graphs="off")
    num_blocks = 8
    for length in LENGTHS:
        tokens = prompt(length)
        steps = prefill_then_decode(tokens, 7)
        for r in (static, eager):
            r.init_kv_cache(num_blocks, BLOCK)
        got = [static.execute(s) for s in steps]
        want = [eager.execute(s) for s in steps]
        assert static.prefill_graphs.steps == 1 and eager.prefill_graphs is None
        full = hf_logits(hf, [tokens + [7]])
        # the prompt's last row, then the decode step that reads the prompt's cached K/V
        torch.testing.assert_close(got[0][0], full[length - 1], rtol=0, atol=1e-4)
        torch.testing.assert_close(got[1][0], full[length], rtol=0, atol=1e-4)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
        # The pads wrote only the scratch block: every block a sequence owns is as eager left it.
        for cache_s, cache_e in zip(caches(static), caches(eager), strict=True):
            torch.testing.assert_close(cache_s[:, :num_blocks], cache_e, rtol=0, atol=1e-6)


def several_prompts(lengths: list[int], seed: int = 0) -> tuple[list[list[int]], dict]:
    """Prompts of these lengths as one prefill step; sequence b owns blocks b, b + S, ..."""
    prompts = [prompt(n, seed + 10 * b) for b, n in enumerate(lengths)]
    S, width = len(lengths), max(-(-n // BLOCK) for n in lengths)
    rows = [[b + i * S for i in range(-(-n // BLOCK))] for b, n in enumerate(lengths)]
    table = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32)
    step = {
        "input_ids": torch.tensor([t for p in prompts for t in p]),
        "query_lens": list(lengths),
        "context_lens": list(lengths),
        "block_tables": table,
    }
    return prompts, step


@pytest.mark.parametrize("lengths", [[5, 16, 9], [3, 1, 4, 1, 5, 9, 2, 6], [16, 16]])
def test_a_graphed_step_of_several_prompts_equals_transformers_and_the_eager_path(
    tmp_path, lengths
):
    hf = make_opt(tmp_path)
    static = ModelRunner(str(tmp_path), rank=0, decode_graphs="static")
    eager = ModelRunner(str(tmp_path), rank=0, decode_graphs="off")
    prompts, step = several_prompts(lengths)
    blocks = len(lengths) * step["block_tables"].shape[1]
    for r in (static, eager):
        r.init_kv_cache(blocks, BLOCK)
    got, want = static.execute(step), eager.execute(step)
    assert static.prefill_graphs.steps == 1 and got.shape[0] == len(lengths)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    ref = torch.stack([hf_logits(hf, [p])[-1] for p in prompts])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    for cache_s, cache_e in zip(caches(static), caches(eager), strict=True):
        torch.testing.assert_close(cache_s[:, :blocks], cache_e, rtol=0, atol=1e-6)


def test_steps_the_prefill_graphs_take_or_not_give_the_eager_result(tmp_path):
    make_llama(tmp_path)
    static = ModelRunner(str(tmp_path), rank=0, decode_graphs="static")
    eager = ModelRunner(str(tmp_path), rank=0, decode_graphs="off")
    a, b = prompt(6), prompt(9)
    nine = several_prompts([2] * 9)[1]  # more prompts than a graph holds
    every_row = {**prefill_then_decode(a, 1)[0], "logits_indices": "all"}
    b_first = {  # b's first 5 tokens, then (below) its last 4 after them: not fresh
        "input_ids": torch.tensor(b[:5]),
        "query_lens": [5],
        "context_lens": [5],
        "block_tables": torch.tensor([[2, 3]], dtype=torch.int32),
    }
    rest = {
        "input_ids": torch.tensor(b[5:]),
        "query_lens": [4],
        "context_lens": [9],
        "block_tables": torch.tensor([[2, 3, 4]], dtype=torch.int32),
    }
    mixed = {  # a new prompt beside a decode of b
        "input_ids": torch.tensor(a + [3]),
        "query_lens": [6, 1],
        "context_lens": [6, 10],
        "block_tables": torch.tensor([[0, 1, -1], [2, 3, 4]], dtype=torch.int32),
    }
    for r in (static, eager):
        r.init_kv_cache(12, BLOCK)
    for step, graphed in ((nine, 0), (every_row, 0), (b_first, 1), (rest, 1), (mixed, 1)):
        before = static.prefill_graphs.steps
        torch.testing.assert_close(static.execute(step), eager.execute(step), rtol=0, atol=1e-5)
        assert static.prefill_graphs.steps - before == graphed
    graphs = static.prefill_graphs
    # llama's window is 2,048, but the cache holds 48 tokens: no bucket may pass them (the
    # capture runs one prompt of each bucket's length, reading it through its block table)
    assert graphs.max_context == 12 * BLOCK and graphs.max_tokens == 32
    assert not graphs.takes([1025], [1025]) and not graphs.takes([600, 600], [600, 600])
    assert not graphs.takes([1] * 9, [1] * 9) and not graphs.takes([4], [49])
    assert not graphs.takes([1, 1], [4, 9])  # decodes only: the decode graphs'
    assert graphs.takes([32], [32]) and graphs.takes([1] * 8, [1] * 8)
    assert not graphs.takes([33], [33])
    assert graphs.takes([3], [4]) and graphs.takes([3, 1], [40, 9])


def cached_prefix_steps() -> tuple[list[dict], list[list[int]]]:
    """As the prefix cache runs it: one prompt prefilled, then another that shares its first
    two blocks (their K/V already cached) computes only its own tokens, beside a new prompt
    (16 blocks of BLOCK tokens). Returns the two steps and the prompts whose last logits the
    second step's rows are."""
    first = prompt(11, seed=4)
    second = first[:8] + prompt(7, seed=5)  # 8 cached tokens (blocks 6, 2), 7 of its own
    third = prompt(5, seed=6)
    steps = [
        {
            "input_ids": torch.tensor(first),
            "query_lens": [11],
            "context_lens": [11],
            "block_tables": torch.tensor([[6, 2, 9]], dtype=torch.int32),
        },
        {
            "input_ids": torch.tensor(third + second[8:]),
            "query_lens": [5, 7],
            "context_lens": [5, 15],
            "block_tables": torch.tensor([[0, 1, -1, -1], [6, 2, 4, 12]], dtype=torch.int32),
        },
    ]
    return steps, [third, second]


def prompt_after_cached_prefix(runner) -> tuple[torch.Tensor, list[list[int]]]:
    """`cached_prefix_steps` on one runner: the second step's logits and their prompts."""
    runner.init_kv_cache(16, BLOCK)
    steps, prompts = cached_prefix_steps()
    return [runner.execute(step) for step in steps][-1], prompts


@pytest.mark.parametrize("family", list(CHECKPOINT_MAKERS))
def test_a_graphed_prompt_after_a_cached_prefix_equals_transformers(tmp_path, family):
    hf = CHECKPOINT_MAKERS[family](tmp_path)
    static = ModelRunner(str(tmp_path), rank=0, decode_graphs="static")
    got, prompts = prompt_after_cached_prefix(static)
    assert static.prefill_graphs.steps == 2
    for row, p in zip(got, prompts, strict=True):
        torch.testing.assert_close(row, hf_logits(hf, [p])[-1], rtol=0, atol=1e-4)


def test_buckets_stop_at_the_context_window_and_the_switch_turns_them_off(tmp_path, monkeypatch):
    make_opt(tmp_path)  # 64 positions
    runner = ModelRunner(str(tmp_path), rank=0, decode_graphs="static")
    runner.init_kv_cache(8, BLOCK)  # a cache of 32 tokens bounds them too
    assert runner.prefill_graphs.buckets == (16, 32)
    runner.init_kv_cache(16, BLOCK)
    assert runner.prefill_graphs.buckets == (16, 32, 64)
    assert runner.info()["prefill_graph_steps"] == 0
    monkeypatch.setenv("ENERGON_PREFILL_GRAPHS", "0")
    runner.init_kv_cache(8, BLOCK)
    assert runner.prefill_graphs is None and runner.graphs is not None


def test_a_table_too_short_for_the_prompt_is_refused(tmp_path):
    make_llama(tmp_path)
    runner = ModelRunner(str(tmp_path), rank=0, decode_graphs="static")
    runner.init_kv_cache(8, BLOCK)
    step = {
        "input_ids": torch.tensor(prompt(9)),
        "query_lens": [9],
        "context_lens": [9],  # needs 3 blocks of 4
        "block_tables": torch.tensor([[0, 1]], dtype=torch.int32),
    }
    with pytest.raises(ValueError, match="cannot hold 9 tokens"):
        runner.execute(step)


def test_graphed_prefills_at_tp2_pp2_equal_transformers(tmp_path):
    """Later stages receive into the static buffer; tp ranks all-reduce the padded rows."""
    from conftest import static_graph_group
    from test_parity import only_last_rank

    hf = make_qwen2(tmp_path)
    group = static_graph_group(tmp_path)
    rows = []
    try:
        for length in (5, 16):
            tokens = prompt(length, seed=1)
            group.broadcast("init_kv_cache", 8, BLOCK)
            rows.append(
                [
                    only_last_rank(group.broadcast("execute", s), 2, 2)
                    for s in prefill_then_decode(tokens, 9)
                ]
            )
            full = hf_logits(hf, [tokens + [9]])
            torch.testing.assert_close(rows[-1][0][0], full[length - 1], rtol=0, atol=1e-4)
            torch.testing.assert_close(rows[-1][1][0], full[length], rtol=0, atol=1e-4)
        assert [i["prefill_graph_steps"] for i in group.broadcast("info")] == [1] * 4
        # a prompt after a cached prefix, beside a new one: every stage and rank reads the
        # prefix's K/V through the graph's block tables
        group.broadcast("init_kv_cache", 16, BLOCK)
        steps, prompts = cached_prefix_steps()
        got = [only_last_rank(group.broadcast("execute", s), 2, 2) for s in steps][-1]
        for row, p in zip(got, prompts, strict=True):
            torch.testing.assert_close(row, hf_logits(hf, [p])[-1], rtol=0, atol=1e-4)
        assert [i["prefill_graph_steps"] for i in group.broadcast("info")] == [2] * 4
    finally:
        group.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["qwen2", "opt", "bloom"])
@pytest.mark.parametrize("dtype, atol", [("float32", 2e-3), ("bfloat16", 0.1)])
def test_captured_prefill_graphs_equal_transformers_on_cuda(tmp_path, family, dtype, atol):
    hf = CHECKPOINT_MAKERS[family](tmp_path)
    runner = ModelRunner(str(tmp_path), rank=0, device="cuda", dtype=dtype)
    eager = ModelRunner(str(tmp_path), rank=0, device="cuda", dtype=dtype, decode_graphs="off")
    for r in (runner, eager):
        r.init_kv_cache(16, BLOCK)  # each prompt rewrites the slots its decode step reads
    for length in [*LENGTHS, 1, 32]:
        tokens = prompt(length)
        steps = prefill_then_decode(tokens, 7)
        got = [runner.execute(s) for s in steps]
        want = [eager.execute(s) for s in steps]
        full = hf_logits(hf, [tokens + [7]])
        torch.testing.assert_close(got[0][0], full[length - 1], rtol=0, atol=atol)
        torch.testing.assert_close(got[1][0], full[length], rtol=0, atol=atol)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=atol / 10)
    assert runner.prefill_graphs.captured and runner.prefill_graphs.steps == 5
    assert runner.info()["graph_error"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["opt", "bloom", "llama"])
@pytest.mark.parametrize("dtype, atol", [("float16", 0.05), ("bfloat16", 0.1)])
def test_captured_graphs_of_a_prompt_after_a_cached_prefix_equal_transformers_on_cuda(
    tmp_path, family, dtype, atol
):
    """Captured, the prompts' attention reads the paged cache (the Triton prefill kernel where
    torch's flash cannot; bloom's ALiBi always)."""
    hf = CHECKPOINT_MAKERS[family](tmp_path)
    runner = ModelRunner(str(tmp_path), rank=0, device="cuda", dtype=dtype)
    got, prompts = prompt_after_cached_prefix(runner)
    assert runner.prefill_graphs.captured and runner.prefill_graphs.steps == 2
    assert runner.info()["graph_error"] is None
    for row, p in zip(got, prompts, strict=True):
        want = hf_logits(hf, [p])[-1]
        torch.testing.assert_close(row.float().cpu(), want, rtol=0, atol=atol)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.timeout(300)
async def test_an_engine_at_tp2_on_cuda_prefills_through_graphs_alone_and_in_a_burst(tmp_path):
    """Captured at tp=2 (their all-reduces on NCCL and the one-shot path by size): prompts
    prefilled one by one, then four submitted together in one graphed step, each equal to
    transformers' greedy continuation."""
    import asyncio

    from engine.engine_helpers import assert_greedy_equal, hf_greedy

    from energon import Engine, SamplingParams

    hf = make_qwen2(tmp_path)
    prompts = [prompt(n, seed=3) for n in (5, 16, 17, 40)]
    refs = [hf_greedy(hf, p, 6) for p in prompts]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    async with Engine(str(tmp_path), tp=2, device="cuda", dtype="float32") as engine:
        before = [i["prefill_graph_steps"] for i in await engine.group.broadcast("info")]
        alone = [await engine.infer(p, params) for p in prompts]
        together = await asyncio.gather(*(engine.infer(p, params) for p in prompts))
        after = [i["prefill_graph_steps"] for i in await engine.group.broadcast("info")]
    assert [a - b for a, b in zip(after, before, strict=True)] == [5, 5]
    for a, t, ref in zip(alone, together, refs, strict=True):
        assert_greedy_equal(a.token_ids, ref)
        assert_greedy_equal(t.token_ids, ref)


def test_a_bucket_longer_than_the_tables_hold_is_refused():
    """The capture runs one prompt of each bucket's length through its block table: a bucket
    past the table's width would read ids beyond it (an illegal address on a GPU)."""
    from energon.prefill_graphs import PrefillGraphs

    options = dict(
        body=lambda x, meta: x, first_stage=True, hidden_size=8, dtype=torch.float32,
        device=torch.device("cpu"), block_size=BLOCK, scratch_block=3, capture=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="largest bucket"):
        PrefillGraphs(last_stage=False, max_blocks=3, buckets=(8, 16), **options)
    assert (
        PrefillGraphs(last_stage=False, max_blocks=4, buckets=(8, 16), **options).max_tokens == 16
    )
