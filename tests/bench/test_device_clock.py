"""DeviceClock: device marks placed on the host's perf_counter timeline without a wait per mark."""

from __future__ import annotations

import time

import pytest
import torch

from energon.bench.device_clock import DeviceClock


def test_cpu_marks_are_the_time_they_were_taken():
    clock = DeviceClock(torch.device("cpu"))
    before = time.perf_counter()
    a = clock.mark()
    time.sleep(0.01)
    b = clock.mark()
    after = time.perf_counter()
    ta, tb = clock.seconds([a, b])
    assert before <= ta < tb <= after
    assert tb - ta >= 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a cuda device")
def test_cuda_marks_are_when_the_stream_reached_them_not_when_they_were_recorded():
    dev = torch.device("cuda", 0)
    clock = DeviceClock(dev)
    x = torch.randn(4096, 4096, device=dev)
    clock.mark()  # anchors on an idle device
    torch.cuda.synchronize(dev)
    recorded = time.perf_counter()
    start = clock.mark()
    for _ in range(50):  # tens of ms of queued work
        x = x @ x / 64
    end = clock.mark()
    queued = time.perf_counter()  # the host got here long before the device did
    t_start, t_end = clock.seconds([start, end])
    done = time.perf_counter()
    torch.testing.assert_close(t_start, recorded, atol=2e-3, rtol=0)
    assert queued < t_end <= done
    assert t_end - t_start > queued - recorded
