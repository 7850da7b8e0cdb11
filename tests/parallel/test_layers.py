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
        "row": row(row_x[:, state.tp_rank * 6 : (state.tp_rank + 1) * 6]),  # a column output
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
