"""Whether a runner's decode steps look for sequences sharing cached prefix blocks: only when
its `shared_prefixes` argument (the Engine's prefix_caching), ENERGON_SHARED_PREFIX and its
attention (the paged decode kernel, CUDA only) all allow it. On cpu the kernel's answer is
stood in for; tests/models/test_shared_prefix_decode.py runs the real one on a GPU."""

import pytest

from energon.parallel.attention import Attention
from energon.parallel.shared_prefix import SHARED_PREFIX_ENV
from energon.runner import ModelRunner


@pytest.mark.parametrize(
    "argument, env, kernel, shares",
    [
        (True, None, True, True),
        (False, None, True, False),  # prefix caching off
        (True, "0", True, False),  # ENERGON_SHARED_PREFIX=0
        (True, None, False, False),  # no paged decode kernel on this device
    ],
)
def test_a_runner_shares_prefixes_only_when_all_allow(monkeypatch, argument, env, kernel, shares):
    monkeypatch.setattr(Attention, "reads_shared_prefixes", lambda self, device, dtype: kernel)
    if env is None:
        monkeypatch.delenv(SHARED_PREFIX_ENV, raising=False)
    else:
        monkeypatch.setenv(SHARED_PREFIX_ENV, env)
    runner = ModelRunner("tiny", rank=0, shared_prefixes=argument)
    assert runner.shares_prefixes is shares
    assert runner.info()["shares_prefixes"] is shares
