"""Stage cutting and activation hand-off between stages."""

import pytest
import torch
from gloo_group import run_in_gloo_group

from energon.parallel.pipeline import cut_stages, recv_activation, send_activation
from energon.parallel.topology import Topology, current_parallel


def test_even_cut_gives_remainder_to_earlier_stages():
    assert cut_stages(5, 2) == [range(0, 3), range(3, 5)]
    assert cut_stages(4, 4) == [range(i, i + 1) for i in range(4)]


def test_user_splits_are_honoured_and_checked():
    assert cut_stages(4, 2, [1, 3]) == [range(0, 1), range(1, 4)]
    with pytest.raises(ValueError, match="summing to 4"):
        cut_stages(4, 2, [2, 3])
    with pytest.raises(ValueError, match="pp=3 is more than"):
        cut_stages(2, 3)


def test_topology_lays_out_stage_major():
    topo = Topology(tp=2, pp=3)
    assert [(topo.stage_of(r), topo.tp_rank_of(r)) for r in range(6)] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1),
    ]  # fmt: skip
    assert topo.rank_of(2, 1) == 5


def test_outside_use_parallel_is_single_device():
    state = current_parallel()
    assert (state.tp_size, state.pp_size, state.is_first_stage, state.is_last_stage) == (
        1,
        1,
        True,
        True,
    )


def relay(state):
    """Stage 0 sends a tensor, stage 1 receives it, over their pair's own group; returns what
    each rank saw (and the pair group's members)."""
    import torch.distributed as dist

    if state.is_first_stage:
        assert state.prev_group is None
        send_activation(
            torch.arange(6.0).view(2, 3) + state.tp_rank, state.next_rank, state.next_group
        )
        pair = dist.get_process_group_ranks(state.next_group)
        return (state.stage, state.tp_rank, state.next_rank, None, pair)
    assert state.next_group is None
    got = recv_activation((2, 3), torch.float32, state.prev_rank, state.device, state.prev_group)
    pair = dist.get_process_group_ranks(state.prev_group)
    return (state.stage, state.tp_rank, state.prev_rank, got, pair)


def test_activation_reaches_same_tp_rank_of_next_stage():
    results = run_in_gloo_group(relay, 2, 2)
    assert [r[:3] for r in results] == [(0, 0, 2), (0, 1, 3), (1, 0, 0), (1, 1, 1)]
    assert [r[4] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    torch.testing.assert_close(results[2][3], torch.arange(6.0).view(2, 3))
    torch.testing.assert_close(results[3][3], torch.arange(6.0).view(2, 3) + 1)
