"""Tensor-parallel layers at tp=2 (gloo) equal the full single-device layer."""

import pytest
import torch
from gloo_group import run_in_gloo_group
from torch import nn

from energon.errors import CheckpointError
from energon.parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    merge_columns,
    merged,
)
from energon.parallel.topology import Topology, init_parallel, use_parallel


class TensorReader:
    """A checkpoint tensor as the loader presents it to weight_loader."""

    def __init__(self, name, tensor):
        self.name, self.tensor = name, tensor
        self.shape, self.dtype = tuple(tensor.shape), tensor.dtype

    def __getitem__(self, index):
        return self.tensor[index]


def load(module, full: dict):
    for name, param in module.named_parameters():
        param.weight_loader(param, TensorReader(name, full[name]))


def references():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g)
    lin = {"weight": torch.randn(12, 8, generator=g), "bias": torch.randn(12, generator=g)}
    row = {"weight": torch.randn(8, 12, generator=g), "bias": torch.randn(8, generator=g)}
    row_x = torch.randn(5, 12, generator=g)
    emb = {"weight": torch.randn(16, 8, generator=g)}
    ids = torch.tensor([0, 7, 8, 15, 3])
    return x, lin, row, row_x, emb, ids


def sharded_outputs(state):
    x, lin, row_w, row_x, emb, ids = references()
    col = ColumnParallelLinear(8, 12)
    load(col, lin)
    row = RowParallelLinear(12, 8)
    load(row, row_w)
    embedding = VocabParallelEmbedding(16, 8)
    load(embedding, emb)
    head = ParallelLMHead(16, 8)
    load(head, emb)
    tied = ParallelLMHead(16, 8)
    tied.tie(embedding)
    return {
        "col": col(x),
        "col_shape": tuple(col.weight.shape),
        # a column output in; at tp > 1 the sum is left to its user (a PartialSum)
        "row_type": type(row(row_x[:, :6])).__name__,
        "row": row(row_x[:, state.tp_rank * 6 : (state.tp_rank + 1) * 6]).sum(),
        "row_shape": tuple(row.weight.shape),
        "emb": embedding(ids),
        "head": head(x),
        "tied_is_shared": tied.weight is embedding.weight,
    }


@pytest.fixture(scope="module")
def tp2_results():
    return run_in_gloo_group(sharded_outputs, 2, 1)


def test_column_parallel_rank_holds_its_output_slice(tp2_results):
    x, lin, *_ = references()
    full = nn.functional.linear(x, lin["weight"], lin["bias"])
    for rank, result in enumerate(tp2_results):
        assert result["col_shape"] == (6, 8)
        torch.testing.assert_close(result["col"], full[:, rank * 6 : (rank + 1) * 6])


def test_row_parallel_all_reduces_to_full_linear(tp2_results):
    _, _, row, row_x, *_ = references()
    full = nn.functional.linear(row_x, row["weight"], row["bias"])
    for result in tp2_results:
        assert result["row_shape"] == (8, 6)
        assert result["row_type"] == "PartialSum"
        torch.testing.assert_close(result["row"], full)


def test_vocab_parallel_embedding_equals_full_lookup(tp2_results):
    *_, emb, ids = references()
    for result in tp2_results:
        torch.testing.assert_close(result["emb"], emb["weight"][ids])


def test_lm_head_all_gathers_full_vocabulary(tp2_results):
    x, *_, emb, _ = references()
    for result in tp2_results:
        torch.testing.assert_close(result["head"], x @ emb["weight"].T)


def test_tie_shares_the_embedding_parameter(tp2_results):
    assert all(r["tied_is_shared"] for r in tp2_results)


def test_single_device_layers_are_plain_linear():
    x, lin, _, _, emb, ids = references()
    col = ColumnParallelLinear(8, 12)
    load(col, lin)
    torch.testing.assert_close(col(x), nn.functional.linear(x, lin["weight"], lin["bias"]))
    embedding = VocabParallelEmbedding(16, 8)
    load(embedding, emb)
    torch.testing.assert_close(embedding(ids), emb["weight"][ids])


def test_column_parallel_applies_its_activation():
    x, lin, _, _, _, _ = references()
    col = ColumnParallelLinear(8, 12)
    load(col, lin)
    expected = nn.functional.relu(nn.functional.linear(x, lin["weight"], lin["bias"]))
    assert torch.equal(col(x, nn.functional.relu), expected)
    gelu = nn.functional.gelu(nn.functional.linear(x, lin["weight"], lin["bias"]))
    assert torch.equal(col(x, nn.functional.gelu), gelu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_relu_fused_into_the_gemm_epilogue_equals_linear_then_relu(dtype):
    torch.manual_seed(0)
    col = ColumnParallelLinear(512, 1024).to("cuda", dtype)
    with torch.no_grad():
        col.weight.normal_(0, 0.05)
        col.bias.normal_(0, 0.5)
    for rows in (1, 7, 64):
        x = torch.randn(rows, 512, device="cuda", dtype=dtype)
        fused = col(x, nn.functional.relu)
        separate = nn.functional.relu(nn.functional.linear(x, col.weight, col.bias))
        assert (fused == 0).sum() > 0  # the ReLU did cut
        torch.testing.assert_close(fused, separate, rtol=1e-2, atol=1e-2)


def test_merged_columns_run_as_one_gemm_with_the_same_parameters():
    torch.manual_seed(0)
    parts = [ColumnParallelLinear(8, n) for n in (12, 4, 4)]
    for lin in parts:
        with torch.no_grad():
            lin.weight.normal_()
            lin.bias.normal_()
    before = [(lin.weight.clone(), lin.bias.clone()) for lin in parts]
    x = torch.randn(5, 8)
    separate = merged(x, *parts)  # not merged yet: one linear each
    merge_columns(*parts)
    fused = merged(x, *parts)
    assert [t.shape for t in fused] == [(5, 12), (5, 4), (5, 4)]
    for lin, (w, b) in zip(parts, before, strict=True):
        assert torch.equal(lin.weight, w) and torch.equal(lin.bias, b)
        assert lin.weight.untyped_storage().data_ptr() == parts[0].merged[0].data_ptr()
    for got, want, lin in zip(fused, separate, parts, strict=True):
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got, nn.functional.linear(x, lin.weight, lin.bias))
    mixed = [ColumnParallelLinear(8, 4), ColumnParallelLinear(8, 4, bias=False)]
    with pytest.raises(ValueError, match="all linears with a bias or all without"):
        merge_columns(*mixed)


def test_tp_not_dividing_out_features_names_it():
    state = init_parallel(Topology(1, 1), 0)
    state.topology = Topology(4, 1)  # pretend tp=4 without a process group: construction only
    with (
        use_parallel(state),
        pytest.raises(CheckpointError, match="tp=4 does not divide vocab_size=10"),
    ):
        VocabParallelEmbedding(10, 8)


def test_weight_loader_rejects_wrong_checkpoint_shape():
    col = ColumnParallelLinear(8, 12)
    with pytest.raises(CheckpointError, match=r"w: expected shape \(12, 8\), found \(12, 9\)"):
        col.weight.weight_loader(col.weight, TensorReader("w", torch.zeros(12, 9)))
