"""Decode steps whose sequences share cached prefix blocks read them once a group
(energon/parallel/shared_prefix.py): the runner's logits equal transformers' and the runner's
own with every sequence reading its whole context.

The paged decode kernel runs on CUDA in half precision only: these are `gpu` tests. The kernel
itself is checked against float64 in tests/parallel/test_paged_attention.py (interpreted on cpu).
"""

import pytest
import torch
from conftest import CHECKPOINT_MAKERS, hf_logits

from energon.runner import ModelRunner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BLOCK = 4
PREFIX = torch.randint(0, 128, (96,), generator=torch.Generator().manual_seed(0)).tolist()
SUFFIXES = [
    torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    for n in (1, 4, 9, 2, 6)
]
SHARED_BLOCKS = len(PREFIX) // BLOCK  # 24 blocks every sequence's table starts with


def steps() -> tuple[list[dict], list[list[int]]]:
    """The prefix and the first suffix as one prompt; the other suffixes after the cached
    prefix in one step; then one decode step of every sequence (token 7). Each table: the
    shared blocks, then the sequence's own (3 each), as the step message carries them."""
    tables = torch.tensor(
        [
            list(range(SHARED_BLOCKS)) + [SHARED_BLOCKS + 3 * i + j for j in range(3)]
            for i in range(len(SUFFIXES))
        ],
        dtype=torch.int32,
    )
    first = PREFIX + SUFFIXES[0]
    rest = SUFFIXES[1:]
    prompts = [PREFIX + s for s in SUFFIXES]
    return [
        {
            "input_ids": torch.tensor(first),
            "query_lens": [len(first)],
            "context_lens": [len(first)],
            "block_tables": tables[:1],
        },
        {
            "input_ids": torch.tensor([t for s in rest for t in s]),
            "query_lens": [len(s) for s in rest],
            "context_lens": [len(PREFIX) + len(s) for s in rest],
            "block_tables": tables[1:],
        },
        {
            "input_ids": torch.tensor([7] * len(SUFFIXES)),
            "query_lens": [1] * len(SUFFIXES),
            "context_lens": [len(p) + 1 for p in prompts],
            "block_tables": tables,
        },
    ], [p + [7] for p in prompts]


@pytest.mark.parametrize("family", ["llama", "mistral", "opt", "bloom"])  # MHA, GQA, ALiBi
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_decodes_after_a_shared_prefix_equal_transformers(tmp_path, family, dtype):
    # OPT's learned positions: room for the 96-token prefix and what follows
    hf = CHECKPOINT_MAKERS[family](
        tmp_path, **({"max_position_embeddings": 128} if family == "opt" else {})
    )
    once = ModelRunner(str(tmp_path), rank=0, device="cuda", dtype=dtype, decode_graphs="off")
    each = ModelRunner(str(tmp_path), rank=0, device="cuda", dtype=dtype, decode_graphs="off")
    assert once.shares_prefixes
    each.shares_prefixes = False  # what ENERGON_SHARED_PREFIX=0 sets
    step_list, sequences = steps()
    got = {}
    for name, r in (("once", once), ("each", each)):
        r.init_kv_cache(48, BLOCK)
        got[name] = [r.execute(s) for s in step_list][-1]
    assert once.shared_prefix_steps == 1 and each.shared_prefix_steps == 0
    want = torch.stack([hf_logits(hf, [s])[-1] for s in sequences])
    atol = 0.05 if dtype == "float16" else 0.1
    torch.testing.assert_close(got["once"], want, rtol=0, atol=atol)
    torch.testing.assert_close(got["once"], got["each"], rtol=0, atol=atol / 5)


def test_captured_graphs_read_a_shared_prefix_once(tmp_path):
    """Decode graphs with groups replay a step with groups (the pass over the prefix captured
    inside); without them the plain graph replays it, reading the prefix once a sequence; with
    no graph at all it runs eagerly, groups and all. All three equal transformers."""
    hf = CHECKPOINT_MAKERS["llama"](tmp_path)
    runner = ModelRunner(str(tmp_path), rank=0, device="cuda", dtype="float16")
    runner.init_kv_cache(48, BLOCK)
    assert runner.shared_graphs.captured and runner.info()["graph_error"] is None
    step_list, sequences = steps()
    for s in step_list[:2]:
        runner.execute(s)
    want = torch.stack([hf_logits(hf, [s])[-1] for s in sequences])
    graphed_once = runner.execute(step_list[2])
    assert runner.shared_graphs.steps == 1 and runner.shared_prefix_steps == 1
    assert runner.graphs.steps == 0
    runner.shared_graphs = None
    graphed_each = runner.execute(step_list[2])  # the same step again: the same slots
    assert runner.graphs.steps == 1 and runner.shared_prefix_steps == 1
    plain, runner.graphs = runner.graphs, None
    eager_once = runner.execute(step_list[2])
    assert plain.steps == 1 and runner.shared_prefix_steps == 2
    for got in (graphed_once, graphed_each, eager_once):
        torch.testing.assert_close(got, want, rtol=0, atol=0.05)
    torch.testing.assert_close(graphed_once, graphed_each, rtol=0, atol=0.01)


@pytest.mark.parametrize("family", ["llama", "bloom"])  # rotary and ALiBi
def test_decodes_beside_a_prompt_read_their_shared_prefix_once(tmp_path, family):
    """A step that mixes the decodes of four sequences after the shared prefix with the fifth
    one's prompt after it (eager: a part each): the decodes' run gets groups, and every row's
    logits equal transformers' and the runner's reading each context whole."""
    hf = CHECKPOINT_MAKERS[family](tmp_path)
    step_list, _ = steps()
    tables = step_list[2]["block_tables"]
    rest = SUFFIXES[1:-1]
    prompts = [PREFIX + s for s in SUFFIXES]
    mixed = [
        step_list[0],
        {
            "input_ids": torch.tensor([t for s in rest for t in s]),
            "query_lens": [len(s) for s in rest],
            "context_lens": [len(PREFIX) + len(s) for s in rest],
            "block_tables": tables[1:-1],
        },
        {  # decodes of sequences 0-3 (token 7), then the last one's own tokens
            "input_ids": torch.tensor([7] * 4 + SUFFIXES[-1]),
            "query_lens": [1] * 4 + [len(SUFFIXES[-1])],
            "context_lens": [len(p) + 1 for p in prompts[:4]] + [len(prompts[-1])],
            "block_tables": tables,
        },
    ]
    once = ModelRunner(str(tmp_path), rank=0, device="cuda", dtype="float16", decode_graphs="off")
    each = ModelRunner(str(tmp_path), rank=0, device="cuda", dtype="float16", decode_graphs="off")
    each.shares_prefixes = False
    got = {}
    for name, r in (("once", once), ("each", each)):
        r.init_kv_cache(48, BLOCK)
        got[name] = [r.execute(s) for s in mixed][-1]
    assert once.shared_prefix_steps == 1 and each.shared_prefix_steps == 0
    sequences = [p + [7] for p in prompts[:4]] + [prompts[-1]]
    want = torch.stack([hf_logits(hf, [s])[-1] for s in sequences])
    torch.testing.assert_close(got["once"], want, rtol=0, atol=0.05)
    torch.testing.assert_close(got["once"], got["each"], rtol=0, atol=0.01)


def test_without_shared_prefixes_no_step_groups_and_no_graphs_for_them(tmp_path):
    """`shared_prefixes=False` (the Engine's prefix_caching=False: no blocks are shared) looks
    for no groups and captures no graphs for steps with them; the step still equals
    transformers, each sequence reading its whole context."""
    hf = CHECKPOINT_MAKERS["llama"](tmp_path)
    runner = ModelRunner(
        str(tmp_path), rank=0, device="cuda", dtype="float16", shared_prefixes=False
    )
    runner.init_kv_cache(48, BLOCK)
    assert not runner.info()["shares_prefixes"] and runner.shared_graphs is None
    step_list, sequences = steps()
    for s in step_list:
        got = runner.execute(s)
    assert runner.shared_prefix_steps == 0 and runner.graphs.steps == 1
    want = torch.stack([hf_logits(hf, [s])[-1] for s in sequences])
    torch.testing.assert_close(got, want, rtol=0, atol=0.05)
