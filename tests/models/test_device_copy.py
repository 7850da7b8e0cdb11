"""Host -> device copies of a step's small tensors (energon/device_copy.py): same values, and on
CUDA the host does not wait for the kernels already queued."""

from __future__ import annotations

import time

import pytest
import torch

from energon.device_copy import host_tensor, to_device


def test_host_tensor_and_to_device_keep_values_and_dtype_on_cpu():
    t = host_tensor([3, 1, 2], torch.int64, torch.device("cpu"))
    assert t.dtype == torch.int64 and t.tolist() == [3, 1, 2]
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    assert torch.equal(to_device(x, "cpu"), x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_copy_does_not_wait_for_the_queued_kernels_where_a_pageable_one_does():
    device = torch.device("cuda")
    values = list(range(64))
    torch.cuda._sleep(2_000_000_000)  # about a second of device work queued ahead
    start = time.perf_counter()
    ids = host_tensor(values, torch.int64, device)
    assert time.perf_counter() - start < 0.3
    torch.cuda._sleep(2_000_000_000)
    start = time.perf_counter()
    pageable = torch.tensor(values).to(device, non_blocking=True)  # what the runner did
    waited = time.perf_counter() - start
    torch.cuda.synchronize()
    assert ids.tolist() == values == pageable.tolist()
    assert waited > 0.3  # the driver synced the stream first: why device_copy exists
