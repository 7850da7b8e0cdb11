"""A worker queues step k+1 while step k runs: its host must never wait for its device inside a
step (energon/host_copy.py). The sleeping kernel queued first makes any such wait a second long.
"""

import time

import pytest
import torch
from conftest import make_llama

from energon.runner import ModelRunner

GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None, "logprobs": 0}


def chunked_step() -> dict:
    """Sequence 0 finishes its 5-token prompt and samples; sequence 1 runs the first 4 tokens of
    a longer one and does not: fewer sampled rows than sequences (the last stage picks them)."""
    return {
        "step_id": 0,
        "input_ids": torch.tensor([1, 5, 9, 3, 7, 3, 12, 13, 14]),
        "query_lens": [5, 4],
        "context_lens": [5, 4],
        "block_tables": torch.tensor([[0, 1], [2, -1]], dtype=torch.int32),
        "sample": [True, False],
        "params": [GREEDY],
        "steps": [0],
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_chunked_prefill_step_samples_without_the_host_waiting_for_the_device(tmp_path):
    make_llama(tmp_path)
    runner = ModelRunner(str(tmp_path), rank=0, device="cuda", decode_graphs="off")
    runner.init_kv_cache(8, 4)
    want = runner.execute_logits(chunked_step())[0].argmax().item()  # also loads the kernels
    runner.init_kv_cache(8, 4)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of device work queued ahead of the step
    start = time.perf_counter()
    reply = runner.sample_step(chunked_step())
    assert time.perf_counter() - start < 0.3  # a synchronous copy of the picked rows: ~1 s
    reply.wait()  # the reply is a Deferred on cuda: the token ids once the step has run
    assert reply.reply()["token_ids"] == [want]
