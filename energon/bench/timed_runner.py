"""The actor `energon bench forward` spawns: a ModelRunner whose own forward is timed on the worker.

Only timings and a few numbers cross ZeroMQ; inputs are built on the worker from token lists and
the LM head computes logits for each sequence's last token only. Every method is called on all
ranks in the same order (the runner's collectives pair up across tp ranks).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from energon.bench.limits import copy_bandwidth, matmul_rate, synchronize
from energon.bench.record import card_name
from energon.parallel.attention import Attention
from energon.parallel.packing import BatchMeta, pack, pad
from energon.runner import ModelRunner


def packed_step(token_lists: list[list[int]], device):
    """Padding-free inputs: (input_ids [T], meta with logits for each sequence's last token)."""
    input_ids, _ = pack(token_lists, device)
    lengths = [len(s) for s in token_lists]
    return input_ids, BatchMeta.for_step(lengths, lengths, logits_indices="last", device=device)


def padded_step(token_lists: list[list[int]], device):
    """The padded baseline's inputs ([B*L] ids, pads carried through every layer), logits for
    each sequence's last real token."""
    input_ids, meta, _ = pad(token_lists, 0, device)
    width = meta.padded_shape[1]
    last = [b * width + len(s) - 1 for b, s in enumerate(token_lists)]
    meta.logits_indices = torch.tensor(last, dtype=torch.int64).to(device)
    return input_ids, meta


STEPS = {"packed": packed_step, "packed-grid": packed_step, "padded": padded_step}


class TimedRunner:
    """A ModelRunner (built from the same keyword arguments) plus timing methods."""

    def __init__(self, **runner_kwargs):
        t0 = time.perf_counter()
        self.runner = ModelRunner(**runner_kwargs)
        synchronize(self.runner.device)
        self.build_s = time.perf_counter() - t0

    def facts(self) -> dict:
        """This rank's card, versions, build time and parameter counts (matmul_params: the
        weights of its decoder layers' matrices, which every token multiplies)."""
        r = self.runner
        params = {id(p): p for p in r.model.parameters()}.values()
        layer_matrices = sum(
            p.numel() for i in r.layer_range for p in r.model.layers[i].parameters() if p.dim() >= 2
        )
        card = torch.cuda.get_device_name(r.device) if r.device.type == "cuda" else card_name()
        nccl = ""
        if r.device.type == "cuda":
            nccl = " nccl " + ".".join(map(str, torch.cuda.nccl.version()))
        return {
            "rank": r.state.rank,
            "device": str(r.device),
            "dtype": str(r.dtype).removeprefix("torch."),
            "card": card,
            "torch": torch.__version__ + nccl,
            "build_s": self.build_s,
            "params": sum(p.numel() for p in params),
            "matmul_params": layer_matrices,
        }

    def limits(self, matmul_size: int, copy_bytes: int) -> dict:
        """This rank's card: {"matmul_flops" (FLOP/s in the model's dtype), "copy_bytes_per_s"}."""
        r = self.runner
        rate = matmul_rate(r.device, r.dtype, matmul_size)
        bandwidth = copy_bandwidth(r.device, copy_bytes)
        if r.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"matmul_flops": rate, "copy_bytes_per_s": bandwidth}

    def attention_paths(self) -> list[str]:
        """The packed kinds this build can time: "packed" (the runner's own attention), and
        "packed-grid" when attention has a flash path that can be switched off (`use_flash`)."""
        layers = [m for m in self.runner.model.modules() if isinstance(m, Attention)]
        return ["packed"] + (["packed-grid"] if layers and hasattr(layers[0], "use_flash") else [])

    @torch.inference_mode()
    def _step(self, kind: str, token_lists: list[list[int]]) -> torch.Tensor | None:
        input_ids, meta = STEPS[kind](token_lists, self.runner.device)
        if kind != "packed-grid":
            return self.runner._run(input_ids, meta)
        layers = [m for m in self.runner.model.modules() if isinstance(m, Attention)]
        saved = [m.use_flash for m in layers]
        try:
            for m in layers:
                m.use_flash = False
            return self.runner._run(input_ids, meta)
        finally:
            for m, flag in zip(layers, saved, strict=True):
                m.use_flash = flag

    def time_forward(self, kind: str, token_lists: list[list[int]], repeat: int) -> list[float]:
        """Seconds of `repeat` forward passes (a kind of STEPS), inputs built inside the
        timed region, each started after a tp barrier and ended by a device synchronise."""
        device = self.runner.device
        samples = []
        for _ in range(repeat):
            synchronize(device)
            if dist.is_initialized():
                dist.barrier()
            t0 = time.perf_counter()
            self._step(kind, token_lists)
            synchronize(device)
            samples.append(time.perf_counter() - t0)
        return samples

    def agreement(self, token_lists: list[list[int]]) -> dict | None:
        """How close the two paths' last-token logits are: {"max_abs_diff", "max_abs",
        "same_argmax"} on the rank that holds logits (last stage, tp rank 0), else None."""
        packed = self._step("packed", token_lists)
        padded = self._step("padded", token_lists)
        if packed is None or self.runner.state.tp_rank != 0:
            return None
        packed, padded = packed.float(), padded.float()
        return {
            "max_abs_diff": (packed - padded).abs().max().item(),
            "max_abs": packed.abs().max().item(),
            "same_argmax": bool(torch.equal(packed.argmax(-1), padded.argmax(-1))),
        }

    def profile(self, kind: str, token_lists: list[list[int]], rows: int = 18) -> str | None:
        """One pass under torch.profiler: the ops that took the most device (or cpu) time, as a
        table, on tp rank 0 of the last stage; None elsewhere."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.runner.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            logits = self._step(kind, token_lists)
            synchronize(self.runner.device)
        if logits is None or self.runner.state.tp_rank != 0:
            return None
        device = self.runner.device.type == "cuda"
        key = "self_cuda_time_total" if device else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=key, row_limit=rows)

    def close(self) -> None:
        self.runner.close()
