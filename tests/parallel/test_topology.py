"""The process group's timeout for collectives and transfers (ENERGON_COLLECTIVE_TIMEOUT_S)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from gloo_group import run_in_gloo_group

from energon.parallel.topology import TIMEOUT_ENV, collective_timeout_s


def test_the_timeout_is_300_s_unless_the_environment_sets_it(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout_s() == 300
    monkeypatch.setenv(TIMEOUT_ENV, "12.5")
    assert collective_timeout_s() == 12.5


@pytest.mark.parametrize("raw", ["0", "-3", "soon", "nan", "inf", ""])
def test_a_timeout_that_is_not_a_positive_number_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv(TIMEOUT_ENV, raw)
    with pytest.raises(ValueError, match=TIMEOUT_ENV):
        collective_timeout_s()


def _wait_for_a_send_that_never_comes(state):
    if state.rank == 0:
        time.sleep(4)  # alive, never sending: its peer's connection stays open
        return None
    t0 = time.monotonic()
    try:
        dist.recv(torch.empty(1), src=0)
    except RuntimeError as exc:
        return time.monotonic() - t0, str(exc)
    return "received"


def test_a_transfer_gives_up_after_the_timeout(monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "1")  # the spawned ranks inherit it
    _, (waited, error) = run_in_gloo_group(_wait_for_a_send_that_never_comes, 1, 2, timeout=60)
    assert 0.7 < waited < 3.5, error  # before its peer leaves (4 s)
    assert "timed out" in error.lower() or "timeout" in error.lower(), error
