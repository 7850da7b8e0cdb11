"""Fixtures the test directories share."""

from __future__ import annotations

import multiprocessing
import os

import pytest


@pytest.fixture(scope="module")
def triton_interpreter():
    """A one-process pool whose worker imports triton with TRITON_INTERPRET=1, where Triton
    kernels run on cpu tensors. The interpreter must be chosen before triton is first imported,
    and torch imports it early, so the variable goes only to that worker, which starts here:
    it never reaches this process or any other test. Skips where triton is not installed."""
    pytest.importorskip("triton")
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # inherited by the worker, which starts right here
    try:
        pool = multiprocessing.get_context("spawn").Pool(1)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()
