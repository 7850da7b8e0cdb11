"""Sampler: greedy, top-k/top-p masks, the sampled distribution, per-request seeds, logprobs."""

import math

import pytest
import torch

from energon.sampler import Sampler, apply_min_p, apply_top_k_top_p, mix_seed
from energon.sampling import RowFeature, SamplingParams

NEG_INF = float("-inf")


def wire(**kwargs) -> dict:
    return SamplingParams(**kwargs).to_wire()


def random_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def empirical(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


# Four tokens with probabilities 0.5, 0.25, 0.15, 0.1, placed out of order in the vocabulary.
PROBS = {2: 0.5, 0: 0.25, 3: 0.15, 1: 0.1}
LOGITS = torch.tensor([[math.log(PROBS[i]) for i in range(4)]], dtype=torch.float64)


def test_greedy_rows_are_the_argmax():
    logits = random_logits(6, 50)
    tokens, logprobs = Sampler(seed=0).sample(logits, [wire(temperature=0)] * 6, [0] * 6)
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()
    assert tokens.dtype == torch.int64 and logprobs is None


def test_greedy_rows_stay_argmax_next_to_sampled_rows():
    logits = random_logits(6, 50)
    params = [wire(temperature=0), wire(temperature=1.0), wire(top_k=1)] * 2
    tokens, _ = Sampler(seed=0).sample(logits, params, [0] * 6)
    argmax = logits.argmax(dim=-1)
    assert [tokens[i].item() for i in (0, 2, 3, 5)] == [argmax[i].item() for i in (0, 2, 3, 5)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_greedy_half_precision_logits_pick_the_float64_argmax(dtype):
    # Rounded to half precision many entries tie; the first of the tied maxima wins either way.
    logits = (random_logits(8, 4000, seed=3) * 0.01).to(dtype)
    tokens, logprobs = Sampler(seed=0).sample(logits, [wire(temperature=0)] * 8, [0] * 8)
    reference = logits.double().argmax(dim=-1)
    assert tokens.tolist() == reference.tolist()
    assert tokens.dtype == torch.int64 and logprobs is None
    _, with_logprobs = Sampler(seed=0).sample(
        logits, [wire(temperature=0, logprobs=2)] * 8, [0] * 8
    )
    assert [row["token_id"] for row in with_logprobs] == reference.tolist()


def test_temperature_below_1e_5_is_greedy():
    logits = random_logits(4, 50) * 1e6  # x / 1e-30 would overflow float32
    tokens, _ = Sampler(seed=0).sample(logits, [wire(temperature=1e-30)] * 4, [0] * 4)
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()


def test_top_k_keeps_the_k_largest_logits():
    masked = apply_top_k_top_p(LOGITS.clone(), torch.tensor([2]), torch.tensor([1.0]))
    assert masked[0].tolist() == [LOGITS[0, 0].item(), NEG_INF, LOGITS[0, 2].item(), NEG_INF]


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.5 < 0.7 <= 0.5 + 0.25: the two most likely tokens.
    masked = apply_top_k_top_p(LOGITS.clone(), torch.tensor([0]), torch.tensor([0.7]))
    assert torch.isfinite(masked[0]).tolist() == [True, False, True, False]
    # 0.75 < 0.8 <= 0.9: three tokens.
    masked = apply_top_k_top_p(LOGITS.clone(), torch.tensor([0]), torch.tensor([0.8]))
    assert torch.isfinite(masked[0]).tolist() == [True, False, True, True]


def test_top_p_always_keeps_the_most_likely_token():
    masked = apply_top_k_top_p(LOGITS.clone(), torch.tensor([0]), torch.tensor([0.01]))
    assert torch.isfinite(masked[0]).tolist() == [False, False, True, False]


def test_top_p_applies_to_the_top_k_survivors_renormalised():
    # After top-k=2 the survivors weigh 2/3 and 1/3; 2/3 >= 0.6 keeps only the first.
    # (On the full distribution 0.5 < 0.6 would have kept two.)
    masked = apply_top_k_top_p(LOGITS.clone(), torch.tensor([2]), torch.tensor([0.6]))
    assert torch.isfinite(masked[0]).tolist() == [False, False, True, False]


def test_masks_apply_per_row():
    logits = LOGITS.repeat(3, 1)
    masked = apply_top_k_top_p(logits, torch.tensor([0, 1, 3]), torch.tensor([1.0, 1.0, 0.7]))
    assert torch.isfinite(masked).sum(dim=-1).tolist() == [4, 1, 2]


def test_draws_follow_softmax_of_logits_over_temperature():
    vocab, draws, temperature = 8, 40_000, 0.7
    logits = random_logits(1, vocab, seed=1) / 3
    params = [wire(temperature=temperature)] * draws
    tokens, _ = Sampler(seed=1).sample(logits.expand(draws, vocab), params, [0] * draws)
    expected = torch.softmax(logits[0].double() / temperature, dim=-1)
    # Standard error is at most sqrt(0.25 / 40000) = 0.0025; 0.01 is four of them.
    assert (empirical(tokens, vocab) - expected).abs().max().item() < 0.01


def test_draws_follow_the_truncated_renormalised_distribution():
    draws = 40_000
    params = [wire(temperature=1.0, top_p=0.8)] * draws
    tokens, _ = Sampler(seed=2).sample(LOGITS.float().expand(draws, 4), params, [0] * draws)
    expected = torch.tensor([0.25, 0.0, 0.5, 0.15], dtype=torch.float64) / 0.9
    frequencies = empirical(tokens, 4)
    assert frequencies[1].item() == 0.0
    assert (frequencies - expected).abs().max().item() < 0.01


def test_min_p_removes_what_transformers_min_p_warper_removes():
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper

    logits = random_logits(6, 300, seed=4)
    for min_p, temperature in [(0.05, 1.0), (0.3, 0.7), (0.9, 1.5), (1.0, 1.0)]:
        hf = MinPLogitsWarper(min_p)(None, TemperatureLogitsWarper(temperature)(None, logits))
        ours = apply_min_p(logits / temperature, torch.full((6,), min_p))
        assert torch.equal(torch.isinf(ours), torch.isinf(hf))
        assert torch.isfinite(ours).sum(dim=-1).min() >= 1  # the most likely token stays
    off = apply_min_p(logits.clone(), torch.zeros(6))
    assert torch.equal(off, logits)


def test_draws_follow_the_min_p_survivors_renormalised():
    draws = 40_000
    params = [wire(temperature=1.0, min_p=0.35)] * draws  # 0.35 x 0.5: 0.25 stays, 0.15 not
    tokens, _ = Sampler(seed=2).sample(LOGITS.float().expand(draws, 4), params, [0] * draws)
    expected = torch.tensor([0.25, 0.0, 0.5, 0.0], dtype=torch.float64) / 0.75
    assert (empirical(tokens, 4) - expected).abs().max().item() < 0.01


def test_seeded_draws_follow_the_distribution_too():
    vocab, draws = 5, 4_000
    logits = random_logits(1, vocab, seed=3) / 3
    params = [wire(seed=11 + i) for i in range(draws)]
    tokens, _ = Sampler(seed=0).sample(logits.expand(draws, vocab), params, [0] * draws)
    expected = torch.softmax(logits[0].double(), dim=-1)
    # Standard error is at most sqrt(0.25 / 4000) < 0.008; 0.035 is over four of them.
    assert (empirical(tokens, vocab) - expected).abs().max().item() < 0.035


def seeded_tokens(sampler, my_logits, mates, row, steps=range(20)) -> list[int]:
    """The tokens a seed=1234 request draws at `steps`, placed at `row` among (params, logits)
    `mates`."""
    me = (wire(temperature=0.9, top_k=50, top_p=0.95, seed=1234), my_logits)
    rows = [*mates[:row], me, *mates[row:]]
    logits = torch.stack([row_logits for _, row_logits in rows])
    params = [row_params for row_params, _ in rows]
    return [sampler.sample(logits, params, [step] * len(rows))[0][row].item() for step in steps]


def test_seeded_request_is_independent_of_batch_mates_and_row():
    vocab = 200
    mine = random_logits(1, vocab, seed=4)[0]
    mate_logits = random_logits(3, vocab, seed=5)
    mates = [
        (wire(temperature=1.3), mate_logits[0]),
        (wire(temperature=0.5, top_p=0.5, seed=7), mate_logits[1]),
        (wire(temperature=0), mate_logits[2]),
    ]
    alone = seeded_tokens(Sampler(seed=0), mine, [], row=0)
    assert len(set(alone)) > 1  # it really samples
    assert seeded_tokens(Sampler(seed=1), mine, mates, row=0) == alone
    assert seeded_tokens(Sampler(seed=2), mine, mates, row=3) == alone
    assert seeded_tokens(Sampler(seed=3), mine, mates[::-1], row=1) == alone


def test_different_seeds_draw_different_tokens():
    logits = torch.zeros(2, 1000)
    tokens = [
        Sampler().sample(logits, [wire(seed=1), wire(seed=2)], [step, step])[0].tolist()
        for step in range(5)
    ]
    assert any(a != b for a, b in tokens)


def test_mix_seed_stays_in_torch_seed_range_and_varies_with_step():
    seeds = {mix_seed(2**63 - 1, step) for step in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)


def test_logprobs_are_log_softmax_of_raw_logits():
    logits = random_logits(3, 100, seed=6)
    params = [wire(temperature=0.8, logprobs=5), wire(temperature=0), wire(top_k=3, logprobs=1)]
    tokens, logprobs = Sampler(seed=0).sample(logits, params, [0, 0, 0])
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert logprobs[1] is None
    for row, k in ((0, 5), (2, 1)):
        got = logprobs[row]
        assert got["token_id"] == tokens[row].item()
        assert got["logprob"] == pytest.approx(reference[row, tokens[row]].item(), abs=1e-6)
        top_values, top_ids = reference[row].topk(k)
        assert got["top_ids"] == top_ids.tolist()
        assert got["top_logprobs"] == pytest.approx(top_values.tolist(), abs=1e-6)


def test_mismatched_params_length_is_refused():
    with pytest.raises(ValueError, match="one params dict"):
        Sampler().sample(torch.zeros(2, 4), [wire()], [0, 0])


def test_banned_ids_are_not_drawn_before_min_tokens_and_logprobs_stay_raw():
    logits = LOGITS.repeat(3, 1)  # token 2 is the most likely everywhere
    ban = {**wire(temperature=0, logprobs=1), "min_tokens": 2, "banned": [2, 99]}  # 99: off-vocab
    params = [ban, ban, wire(temperature=0)]
    tokens, logprobs = Sampler(seed=0).sample(logits.clone(), params, [1, 2, 0])
    assert tokens.tolist() == [0, 2, 2]  # row 0 is at its 2nd token: 2 is banned, 0 is next
    assert logprobs[0]["logprob"] == pytest.approx(math.log(PROBS[0]))  # raw, not renormalised
    assert logprobs[0]["top_ids"] == [2]
    # drawn rows: the banned id never comes up before min_tokens; the rest keep their odds
    draws = 4_000
    rows = [{**wire(seed=11 + i), "min_tokens": 5, "banned": [2]} for i in range(draws)]
    many = LOGITS.expand(draws, 4)
    early, _ = Sampler(seed=0).sample(many, rows, [4] * draws)
    late, _ = Sampler(seed=0).sample(many, rows, [5] * draws)
    assert 2 not in early.tolist()
    renormalised = torch.tensor([PROBS[i] if i != 2 else 0.0 for i in range(4)]) / 0.5
    assert (empirical(early, 4) - renormalised.double()).abs().max().item() < 0.035
    assert (empirical(late, 4)[2] - PROBS[2]).abs().item() < 0.035


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bans_take_what_cpu_takes_without_a_host_sync():
    logits = random_logits(8, 1000).half()
    argmax = logits.argmax(dim=-1).tolist()
    params = [{**wire(temperature=0), "min_tokens": 3, "banned": [t, 999]} for t in argmax]
    steps = [0, 1, 2, 3] * 2
    cpu, _ = Sampler(seed=0).sample(logits.clone(), params, steps)
    on_cuda = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host sync inside sample() raises
    try:
        gpu, _ = Sampler("cuda", seed=0).sample(on_cuda, params, steps)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert gpu.tolist() == cpu.tolist()
    assert [t == a for t, a in zip(cpu.tolist(), argmax, strict=True)] == [s >= 3 for s in steps]


# ------------------------------------------------------------------ logit bias and penalties


def penalised(seq: int, history=None, prompt=None, **kwargs) -> dict:
    """A row's wire params as step.py sends them for sequence `seq` of a request with penalties
    or a logit_bias: the bias only with a history (the first row after a (re)start)."""
    row = {**wire(**{"temperature": 0, **kwargs}), "seq": seq}
    if history is not None:
        row["history"] = history
    else:
        row.pop("bias_ids", None)
        row.pop("bias_values", None)
    if prompt is not None:
        row["prompt"] = prompt
    return row


def test_bias_then_repetition_then_frequency_and_presence_by_hand():
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    rules = dict(
        repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=1.0, logit_bias={1: 4.0}
    )
    sampler = Sampler(seed=0)
    first = penalised(7, history=[3, 3, 0], prompt=[2], **rules)
    # bias: [1, 2, 0.5, 3]; seen (prompt 2, output 0 and 3) halved: [0.5, 2, 0.25, 1.5];
    # minus 0.5 x count and 1 x present: 0 -> 0.5 - 0.5 - 1, 3 -> 1.5 - 1 - 1
    assert sampler.penalties.apply(logits, [first]).tolist() == [[-1.0, 2.0, 0.25, -0.5]]
    tokens, _ = sampler.sample(logits, [first], [3])
    assert tokens.tolist() == [1]  # counted: 1 is now in the output once
    later = penalised(7, **rules)
    assert sampler.penalties.apply(logits, [later]).tolist() == [[-1.0, -0.5, 0.25, -0.5]]
    assert sampler.sample(logits, [later], [4])[0].tolist() == [2]
    assert logits.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # the raw logits are left as they were


def test_rows_without_penalties_in_a_penalised_batch_are_left_alone():
    logits = random_logits(3, 50)
    bias = {int(logits[1].argmin()): 100.0}
    params = [
        wire(temperature=0),
        penalised(2, history=[], logit_bias=bias),
        penalised(1, history=[], frequency_penalty=1.0),
    ]
    out = Sampler(seed=0).penalties.apply(logits, params)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])  # nothing seen yet
    assert Sampler(seed=0).sample(logits, params, [0, 0, 0])[0][1].item() == next(iter(bias))
    with pytest.raises(ValueError, match="logit_bias comes on a row with its history"):
        Sampler().penalties.apply(logits[:1], [{**wire(logit_bias=bias), "seq": 4}])


def test_counts_grow_past_the_first_table_are_released_and_rebuilt_from_a_history():
    vocab = 6
    sampler = Sampler(seed=0)
    table = sampler.penalties
    rows = [penalised(seq, history=[seq % vocab], frequency_penalty=1.0) for seq in range(20)]
    logits = torch.zeros(20, vocab)
    out = table.apply(logits, rows)  # 20 sequences: the tables grew from 8 rows
    assert out.argmin(dim=-1).tolist() == [seq % vocab for seq in range(20)]
    table.release(range(0, 20, 2))
    table.release([999])  # unknown ids are ignored
    assert sorted(table.slots) == list(range(1, 20, 2))
    with pytest.raises(ValueError, match="no tokens kept for sequence 0"):
        table.apply(logits[:1], [penalised(0, frequency_penalty=1.0)])
    # a sequence seen again (a recompute) starts over from the history it carries
    again = table.apply(logits[:2], [penalised(3, history=[5, 5], frequency_penalty=1.0)] * 2)
    assert again[0].tolist() == [0.0] * 5 + [-2.0]
    assert len(table.slots) == 10 and table.capacity >= 20
    # a long history and output grow the tables' width too
    long = penalised(50, history=list(range(6)) * 20, presence_penalty=1.0)
    assert table.apply(logits[:1], [long]).tolist() == [[-1.0] * 6]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_penalties_take_what_cpu_takes_without_a_host_sync():
    logits = random_logits(6, 1000).half()
    rules = dict(repetition_penalty=1.3, frequency_penalty=0.7, logit_bias={5: 2.0, 9: -1.0})
    first = [penalised(i, history=[i, 3 * i], prompt=[1, 2, i], **rules) for i in range(4)]
    first += [penalised(4, history=[], logit_bias={7: 50.0}), wire(temperature=0)]
    later = [penalised(i, **rules) for i in range(5)] + first[5:]
    cpu = Sampler(seed=0)
    expected = [cpu.sample(logits.clone(), rows, [2] * 6)[0].tolist() for rows in (first, later)]
    on_cuda = logits.cuda()
    gpu = Sampler("cuda", seed=0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host sync inside sample() raises
    try:
        got = [gpu.sample(on_cuda, rows, [2] * 6)[0] for rows in (first, later)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [t.tolist() for t in got] == expected


def test_a_mixed_batch_samples_each_row_as_it_would_alone():
    logits = random_logits(6, 400, seed=9)
    rows = [
        wire(temperature=0),
        penalised(1, [], logit_bias={int(logits[1].argmin()): 60.0, 400: 5.0, 401: 1.0}),
        penalised(3, history=[int(logits[2].argmax())] * 3, temperature=0.9, seed=1, frequency_penalty=2),
        wire(temperature=0.7, top_k=5, top_p=0.8, seed=2),
        penalised(5, history=[], prompt=[int(logits[4].argmax())], temperature=0, repetition_penalty=9),
        penalised(6, [], temperature=1.3, min_p=0.2, seed=3, logit_bias={7: -100}),
    ]  # fmt: skip
    batch, _ = Sampler(seed=0).sample(logits, rows, [3] * 6)
    alone = [
        Sampler(seed=0).sample(logits[i : i + 1], [r], [3])[0].item() for i, r in enumerate(rows)
    ]
    assert batch.tolist() == alone
    # the bias of 400 and 401 (past the vocabulary) adds nothing
    assert alone[1] == int(logits[1].argmin())
    assert alone[4] != int(logits[4].argmax())  # the prompt's token, divided by 9
    # the controller's features say what to look for; the same answer as working them out
    again, _ = Sampler(seed=0).sample(logits, rows, [3] * 6, features=RowFeature.ALL)
    assert again.tolist() == alone
