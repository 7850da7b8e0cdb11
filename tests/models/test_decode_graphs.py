"""Decode graphs (energon/decode_graphs.py): the static-buffer path a CUDA graph replays.

On cpu the same path runs eagerly ("static"): pad rows, the scratch block and the buffers are
all exercised; only the capture itself needs a GPU (the `gpu` tests at the end).
"""

import time

import pytest
import torch
from conftest import hf_logits, make_llama, make_mistral, make_opt, make_qwen2
from test_parity import decode_steps

from energon.parallel.attention import Attention
from energon.runner import ModelRunner

SEQS = [[1, 5, 9, 3, 7, 11], [3, 12, 13, 14, 15, 16, 17, 100, 127], [4, 8, 8, 2]]
DECODE = 3
MAKERS = {"llama": make_llama, "mistral": make_mistral, "opt": make_opt, "qwen2": make_qwen2}


def tensor_tables(steps):
    """The step message's form of the block tables: one int32 tensor padded with -1."""
    for step in steps:
        rows = step["block_tables"]
        width = max(len(r) for r in rows)
        step["block_tables"] = torch.tensor(
            [list(r) + [-1] * (width - len(r)) for r in rows], dtype=torch.int32
        )
    return steps


def run_steps(runner, steps, num_blocks, block_size):
    runner.init_kv_cache(num_blocks, block_size)
    return [runner.execute(step) for step in steps]


@pytest.mark.parametrize("family", list(MAKERS))
def test_static_decode_path_equals_transformers_and_the_eager_path(tmp_path, family):
    hf = MAKERS[family](tmp_path)
    prompt_lens = [len(s) - DECODE for s in SEQS]
    steps, num_blocks, block_size = decode_steps(SEQS, prompt_lens)
    steps = tensor_tables(steps)
    static = ModelRunner(str(tmp_path), rank=0, decode_graphs="static")
    eager = ModelRunner(str(tmp_path), rank=0, decode_graphs="off")
    got = run_steps(static, steps, num_blocks, block_size)
    want = run_steps(eager, steps, num_blocks, block_size)
    assert static.graphs.steps == DECODE and eager.graphs is None  # 3 sequences: bucket 4
    full = hf_logits(hf, SEQS).split([len(s) for s in SEQS])
    for b, (seq_logits, p) in enumerate(zip(full, prompt_lens, strict=True)):
        rows = torch.stack([r[b] for r in got])
        torch.testing.assert_close(rows, seq_logits[p - 1 : p - 1 + len(got)], rtol=0, atol=1e-4)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    # The pad row wrote only the scratch block: every block a sequence owns is as eager left it.
    caches = [
        [m.kv_cache for m in r.model.modules() if isinstance(m, Attention)] for r in (static, eager)
    ]
    assert caches[0]
    for cache_s, cache_e in zip(*caches, strict=True):
        assert cache_s.shape[1] == cache_e.shape[1] + 1  # the scratch block
        torch.testing.assert_close(cache_s[:, :num_blocks], cache_e, rtol=0, atol=1e-6)
        assert cache_s[:, num_blocks].abs().sum() > 0  # the pad row's K/V went there


def test_steps_the_graphs_cannot_take_run_eagerly_with_the_same_result(tmp_path):
    make_llama(tmp_path)
    runner = ModelRunner(str(tmp_path), rank=0, decode_graphs="static")
    eager = ModelRunner(str(tmp_path), rank=0, decode_graphs="off")
    prompt_lens = [len(s) - DECODE for s in SEQS]
    steps, num_blocks, block_size = decode_steps(SEQS, prompt_lens)
    steps = tensor_tables(steps)
    for r in (runner, eager):
        r.init_kv_cache(num_blocks, block_size)
    runner.execute(steps[0])  # prefill: several tokens per sequence
    assert runner.graphs.steps == 0
    eager.execute(steps[0])
    wide = dict(steps[1])  # a table wider than the graphs were captured for
    extra = runner.graphs.max_blocks + 1 - wide["block_tables"].shape[1]
    wide["block_tables"] = torch.nn.functional.pad(wide["block_tables"], (0, extra), value=-1)
    torch.testing.assert_close(runner.execute(wide), eager.execute(steps[1]), rtol=0, atol=1e-5)
    assert runner.graphs.steps == 0
    torch.testing.assert_close(runner.execute(steps[2]), eager.execute(steps[2]), rtol=0, atol=1e-5)
    assert runner.graphs.steps == 1
    assert not runner.graphs.takes([1] * (runner.graphs.max_batch + 1), 1)
    assert not runner.graphs.takes([1, 2], 1)


def test_a_table_too_short_for_its_context_is_refused(tmp_path):
    make_llama(tmp_path)
    runner = ModelRunner(str(tmp_path), rank=0, decode_graphs="static")
    runner.init_kv_cache(8, 4)
    step = {
        "input_ids": torch.tensor([5]),
        "query_lens": [1],
        "context_lens": [9],  # needs 3 blocks of 4
        "block_tables": torch.tensor([[0, 1, -1]], dtype=torch.int32),
    }
    with pytest.raises(ValueError, match="cannot hold 9 tokens"):
        runner.execute(step)


def test_the_scratch_block_is_not_offered_to_the_scheduler(tmp_path):
    make_llama(tmp_path)
    static = ModelRunner(str(tmp_path), rank=0, decode_graphs="static")
    eager = ModelRunner(str(tmp_path), rank=0, decode_graphs="off")
    memory = 1 << 20
    assert static.kv_blocks_fit(4, memory) == eager.kv_blocks_fit(4, memory) - 1


def test_a_kv_cache_larger_than_the_device_has_room_for_is_refused(tmp_path, monkeypatch):
    make_llama(tmp_path)
    runner = ModelRunner(str(tmp_path), rank=0, decode_graphs="off")
    monkeypatch.setattr(runner, "_kv_room", lambda: 1 << 20)  # a device with 1 MiB to spare
    assert runner.kv_blocks_fit(4, 1 << 20) == runner.kv_blocks_fit(4) > 0
    with pytest.raises(ValueError, match="more than the 1048576 bytes worker 0 has room for"):
        runner.kv_blocks_fit(4, (1 << 20) + 1)
    with pytest.raises(ValueError, match="decode_graphs must be"):
        ModelRunner(str(tmp_path), rank=0, decode_graphs="sometimes")
    with pytest.raises(ValueError, match="needs a cuda device"):
        ModelRunner(str(tmp_path), rank=0, decode_graphs="capture")


def test_auto_is_off_on_cpu_and_for_dynamic_rope(tmp_path):
    make_llama(tmp_path)
    assert ModelRunner(str(tmp_path), rank=0).decode_graphs == "off"
    dyn = tmp_path / "dynamic"
    make_llama(dyn, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert ModelRunner(str(dyn), rank=0, decode_graphs="static").decode_graphs == "off"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["qwen2", "opt"])
@pytest.mark.parametrize("dtype, atol", [("float32", 2e-3), ("bfloat16", 0.1)])
def test_captured_graphs_equal_transformers_on_cuda(tmp_path, family, dtype, atol):
    hf = MAKERS[family](tmp_path)
    prompt_lens = [len(s) - DECODE for s in SEQS]
    steps, num_blocks, block_size = decode_steps(SEQS, prompt_lens)
    steps = tensor_tables(steps)
    runner = ModelRunner(str(tmp_path), rank=0, device="cuda", dtype=dtype)
    eager = ModelRunner(str(tmp_path), rank=0, device="cuda", dtype=dtype, decode_graphs="off")
    got = run_steps(runner, steps, num_blocks, block_size)
    want = run_steps(eager, steps, num_blocks, block_size)
    assert runner.graphs.captured and runner.graphs.steps == DECODE
    full = hf_logits(hf, SEQS).split([len(s) for s in SEQS])
    for b, (seq_logits, p) in enumerate(zip(full, prompt_lens, strict=True)):
        rows = torch.stack([r[b] for r in got])
        torch.testing.assert_close(rows, seq_logits[p - 1 : p - 1 + len(got)], rtol=0, atol=atol)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=atol / 10)
    # One sequence alone, then two: other buckets replay with the same result as eager.
    for n in (1, 2):
        sub = tensor_tables(decode_steps(SEQS[:n], prompt_lens[:n])[0])
        got = run_steps(runner, sub, num_blocks, block_size)
        want = run_steps(eager, sub, num_blocks, block_size)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=atol / 10)


def test_static_decode_path_at_tp2_pp2_equals_transformers(tmp_path):
    """Later stages receive into the static buffer; tp ranks all-reduce on padded rows."""
    from conftest import static_graph_group
    from test_parity import only_last_rank

    hf = make_qwen2(tmp_path)
    group = static_graph_group(tmp_path)
    try:
        prompt_lens = [len(s) - DECODE for s in SEQS]
        steps, num_blocks, block_size = decode_steps(SEQS, prompt_lens)
        group.broadcast("init_kv_cache", num_blocks, block_size)
        rows = [only_last_rank(group.broadcast("execute", s), 2, 2) for s in tensor_tables(steps)]
        assert [i["graph_steps"] for i in group.broadcast("info")] == [DECODE] * 4
    finally:
        group.close()
    full = hf_logits(hf, SEQS).split([len(s) for s in SEQS])
    for b, (seq_logits, p) in enumerate(zip(full, prompt_lens, strict=True)):
        got = torch.stack([r[b] for r in rows])
        torch.testing.assert_close(got, seq_logits[p - 1 : p - 1 + len(rows)], rtol=0, atol=1e-4)


def test_a_capture_that_fails_leaves_the_runner_eager_with_the_reason(tmp_path, monkeypatch):
    import energon.runner as runner_module

    class Uncapturable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("operation not permitted when stream is capturing")

    make_llama(tmp_path)
    runner = ModelRunner(str(tmp_path), rank=0, decode_graphs="static")
    eager = ModelRunner(str(tmp_path), rank=0, decode_graphs="off")
    monkeypatch.setattr(runner_module, "DecodeGraphs", Uncapturable)
    with pytest.raises(RuntimeError, match="stream is capturing"):  # static: a bug, raised
        runner.init_kv_cache(16, 4)
    runner.decode_graphs = "capture"  # what "auto" picks on cuda
    prompt_lens = [len(s) - DECODE for s in SEQS]
    steps, num_blocks, block_size = decode_steps(SEQS, prompt_lens)
    steps = tensor_tables(steps)
    got = run_steps(runner, steps, num_blocks, block_size)
    assert runner.graphs is None and runner.decode_graphs == "off"
    assert "stream is capturing" in runner.info()["graph_error"]
    for g, w in zip(got, run_steps(eager, steps, num_blocks, block_size), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_staging_a_step_does_not_wait_for_the_device_to_finish_the_steps_before():
    """A later pipeline stage's steps wait on its device for their input: staging the next
    ones (while replies of finished steps wait on the same thread) must not block the host."""
    from energon.decode_graphs import STAGING, DecodeGraphs

    device = torch.device("cuda")
    graphs = DecodeGraphs(
        lambda x, meta: x,
        first_stage=True,
        hidden_size=8,
        dtype=torch.float16,
        device=device,
        block_size=16,
        scratch_block=0,
        max_blocks=4,
        buckets=(4,),
        capture=False,
    )
    tables = torch.tensor([[1, 2], [3, -1]], dtype=torch.int32)
    ids = torch.tensor([5, 6], device=device)
    torch.cuda._sleep(2_000_000_000)  # about a second of device work queued ahead of the copies
    start = time.perf_counter()
    for _ in range(STAGING - 1):
        out = graphs.run(ids, [20, 3], tables)
    assert time.perf_counter() - start < 0.3  # one buffer: the second step waited ~1 s
    torch.cuda.synchronize()
    assert out.tolist() == [5, 6] and graphs.positions[:2].tolist() == [19, 2]


def test_graphs_with_groups_hold_each_steps_groups_in_static_buffers():
    """Graphs with groups take a step's groups (energon/parallel/shared_prefix.py) into their
    static buffers: a step with fewer groups than the last leaves no stale group behind, the
    pad rows have no prefix; plain graphs take no step with groups and these none without."""
    from energon.decode_graphs import DecodeGraphs
    from energon.parallel.shared_prefix import find_shared_prefixes

    seen = []
    graphs = DecodeGraphs(
        lambda x, meta: seen.append(meta.shared) or x,
        first_stage=True, hidden_size=8, dtype=torch.float32, device=torch.device("cpu"),
        block_size=4, scratch_block=30, max_blocks=8, buckets=(2, 4, 8), capture=False,
        groups=2, prefix_parts=3,
    )  # fmt: skip
    plain = DecodeGraphs(
        lambda x, meta: x, first_stage=True, hidden_size=8, dtype=torch.float32,
        device=torch.device("cpu"), block_size=4, scratch_block=30, max_blocks=8, buckets=(4,),
        capture=False,
    )  # fmt: skip
    # two groups: 0 and 2 after blocks 0-2, 1 and 3 after blocks 5-6; then one group
    two = torch.tensor([[0, 1, 2, 9], [5, 6, 10, -1], [0, 1, 2, 11], [5, 6, 12, -1]])
    one = torch.tensor([[0, 1, 2, 9], [0, 1, 2, 11], [20, 21, 22, -1]])
    for tables, contexts in ((two, [14, 10, 15, 9]), (one, [14, 15, 11])):
        shared = find_shared_prefixes([1] * len(contexts), contexts, tables, 4, min_prefix=8)
        assert graphs.takes([1] * len(contexts), 4, shared)
        assert not plain.takes([1] * len(contexts), 4, shared)
        assert not graphs.takes([1] * len(contexts), 4, None) and plain.takes([1] * 3, 4)
        ids = torch.arange(len(contexts))
        graphs.run(ids, contexts, tables, shared=shared)
        got = seen[-1]
        B, G = len(contexts), shared.num_groups
        assert got.parts == 3 and got.prefix_lens.shape == (4,)  # the bucket of 4 rows
        assert got.prefix_lens[:B].tolist() == shared.prefix_lens.tolist()
        assert got.prefix_lens[B:].tolist() == [0] * (4 - B)
        assert got.group_sizes.tolist() == shared.group_sizes.tolist() + [0] * (2 - G)
        assert got.group_lens.tolist() == shared.group_lens.tolist() + [0] * (2 - G)
        for g in range(G):
            size = int(shared.group_sizes[g])
            assert got.group_seqs[g, :size].tolist() == shared.group_seqs[g, :size].tolist()
    assert graphs.steps == 2
