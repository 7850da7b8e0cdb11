"""Energon's logits equal Hugging Face's, for every family in CHECKPOINT_MAKERS and every layout.

Each layout's workers are spawned once (energon.actors) and host one ModelRunner per family.
Only the last stage's tp rank 0 returns logits; every other rank returns None.
"""

import pytest
import torch
from conftest import CHECKPOINT_MAKERS, hf_logits

pytestmark = pytest.mark.timeout(300)

SEQS = [[1, 5, 9, 3, 7, 11], [2], [3, 12, 13, 14, 15, 16, 17, 100, 127], [4, 8, 8]]
FAMILIES = list(CHECKPOINT_MAKERS)


def only_last_rank(results, tp, pp):
    """The one non-None result, which must come from the last stage's tp rank 0."""
    owner = (pp - 1) * tp
    assert all(r is None for i, r in enumerate(results) if i != owner)
    return results[owner]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_forward_equals_transformers(runner_set, checkpoints, family):
    tp, pp, group = runner_set
    logits = only_last_rank(group.broadcast("call", family, "forward", SEQS), tp, pp)
    expected = hf_logits(checkpoints[family][1], SEQS)
    assert logits.dtype == torch.float32 and logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_baseline_equals_packed_forward(runner_set, family):
    tp, pp, group = runner_set
    packed = only_last_rank(group.broadcast("call", family, "forward", SEQS), tp, pp)
    padded = only_last_rank(group.broadcast("call", family, "forward_padded", SEQS), tp, pp)
    torch.testing.assert_close(padded, packed, rtol=0, atol=1e-5)


def decode_steps(seqs, prompt_lens, block_size=4):
    """Step dicts: one prefill of each sequence's prompt, then one token per sequence per step.

    Blocks are interleaved across sequences (sequence b owns b, b+B, ...) so a wrong table shows."""
    n = len(seqs)
    per_seq = max(-(-len(s) // block_size) for s in seqs)
    tables = [[b + i * n for i in range(per_seq)] for b in range(n)]
    steps = [
        {
            "input_ids": torch.tensor(
                [t for s, p in zip(seqs, prompt_lens, strict=True) for t in s[:p]]
            ),
            "query_lens": list(prompt_lens),
            "context_lens": list(prompt_lens),
            "block_tables": tables,
            "logits_indices": "last",
        }
    ]
    for k in range(len(seqs[0]) - prompt_lens[0]):
        steps.append(
            {
                "input_ids": torch.tensor(
                    [s[p + k] for s, p in zip(seqs, prompt_lens, strict=True)]
                ),
                "query_lens": [1] * n,
                "context_lens": [p + k + 1 for p in prompt_lens],
                "block_tables": tables,
                "logits_indices": "last",
            }
        )
    return steps, n * per_seq, block_size


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_through_kv_cache_equals_full_forward(runner_set, checkpoints, family):
    tp, pp, group = runner_set
    seqs = [[1, 5, 9, 3, 7, 11], [3, 12, 13, 14, 15, 16, 17, 100, 127], [4, 8, 8, 2]]
    decode = 3
    prompt_lens = [len(s) - decode for s in seqs]
    steps, num_blocks, block_size = decode_steps(seqs, prompt_lens)
    group.broadcast("call", family, "init_kv_cache", num_blocks, block_size)
    rows = [only_last_rank(group.broadcast("call", family, "execute", s), tp, pp) for s in steps]
    full = hf_logits(checkpoints[family][1], seqs).split([len(s) for s in seqs])
    for b, (seq_logits, p) in enumerate(zip(full, prompt_lens, strict=True)):
        got = torch.stack([r[b] for r in rows])  # prompt's last token, then each decoded token
        torch.testing.assert_close(got, seq_logits[p - 1 : p - 1 + len(rows)], rtol=0, atol=1e-4)


def test_a_step_whose_ids_do_not_match_its_lengths_fails_on_every_rank(runner_set):
    """Later stages take activations, not ids, but still count them: a malformed step is
    refused on every rank before any stage waits for another, so the next step runs."""
    tp, pp, group = runner_set
    seqs = [[1, 5, 9, 3], [3, 12, 13]]
    steps, num_blocks, block_size = decode_steps(seqs, [3, 2])
    group.broadcast("call", "llama", "init_kv_cache", num_blocks, block_size)
    bad = {**steps[0], "input_ids": torch.cat([steps[0]["input_ids"], torch.tensor([7])])}
    with pytest.raises(Exception, match="query_lens sum to"):
        group.broadcast("call", "llama", "execute", bad)
    rows = only_last_rank(group.broadcast("call", "llama", "execute", steps[0]), tp, pp)
    assert rows.shape[0] == len(seqs)


@pytest.fixture(scope="module")
def model_runner_group(checkpoints):
    """ModelRunner itself as the actor (no RunnerSet in between), qwen2 at tp=2, pp=2."""
    from conftest import RunnerGroup, free_port

    kwargs = dict(
        model=str(checkpoints["qwen2"][0]),
        tp=2,
        pp=2,
        init_method=f"tcp://127.0.0.1:{free_port()}",
    )
    group = RunnerGroup("energon.runner:ModelRunner", 4, kwargs)
    yield group
    group.close()


def test_spawned_model_runners_equal_transformers(model_runner_group, checkpoints):
    logits = only_last_rank(model_runner_group.broadcast("forward", SEQS), 2, 2)
    expected = hf_logits(checkpoints["qwen2"][1], SEQS)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_each_spawned_rank_reports_its_stage_and_slices(model_runner_group):
    infos = model_runner_group.broadcast("info")
    assert [(i["stage"], i["tp_rank"], i["layers"]) for i in infos] == [
        (0, 0, [0, 2]), (0, 1, [0, 2]), (1, 0, [2, 3]), (1, 1, [2, 3]),
    ]  # fmt: skip
    reports = model_runner_group.broadcast("load_report")
    reads = {tensor: index for tensor, _, index, _ in reports[3]["reads"]}
    assert reads["model.layers.2.self_attn.q_proj.weight"] == "[32:64, :]"
    assert reads["model.embed_tokens.weight"] == "[64:128, :]"  # the tied head's rows
    assert not any(t.startswith("model.layers.0.") for t in reads)
