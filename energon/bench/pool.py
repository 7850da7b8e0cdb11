"""`energon bench pool`: a stage whose weights do not fit, with the rest in peer or host memory.

Issue: worker 0 with a budget that holds only about half of the `opt-13b` preset (fp16) borrows
the rest from GPU 1. In one run, on the same cards:

- the card's ceilings: the peer link GPU1->GPU0 (and back) over a real pool lease (CUDA IPC, the
  bytes the staging copies move), pinned host->GPU over a real host lease, device copy (HBM, read
  + written) and an fp16 matmul rate;
- four ways to run the same model on GPU 0: resident (everything fits), pooled-peer (the layers
  beyond the budget live on GPU 1, `energon.pool`), pooled-host (pinned shared memory) and
  accelerate's `device_map` offload (the layers beyond the same budget on the cpu);
- for each: prefill of 32 x 512 tokens (one padding-free forward, last-token logits), tokens/s;
  a decode step of 64 sequences at a 512-token context with a paged KV cache, ms/step; the pooled
  bytes per step and the copy bandwidth they achieve.

Goals: pooled-peer prefill >= 0.9x resident; pooled decode within 1.15x of its floor,
max(resident step, pooled bytes per step / measured link bandwidth); both >= 5x accelerate.

Timing runs on the worker (`PoolBenchWorker`, an actor that hosts the ModelRunner and lends or
borrows through the pool like an Engine worker); only timings and facts cross ZeroMQ. Worker 1
lends its GPU (or, on a cpu run, shared memory). The pooled layers are made by `energon.pool`
exactly as an Engine with `pool=..., gpu_memory_budget=...` makes them (`pool_weights`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import random
import statistics
import sys
import time

from energon.bench.options import (
    add_model_arguments,
    pick_matmul_size,
    resolve_device,
    visible_gpus,
)
from energon.bench.record import Record, card_name, print_records, write_results
from energon.models.registry import resolve
from energon.parallel.topology import NO_MULTICAST_ENV
from energon.pool.member import PoolMember

SCENARIO = "pool"
ACTOR = "energon.bench.pool:PoolBenchWorker"
CHILD_ENV = NO_MULTICAST_ENV  # NVLink multicast off, in every child process too
MODES = ("resident", "peer", "host", "accelerate")
GiB = 1 << 30


# ------------------------------------------------------------------------------- the worker


@contextlib.contextmanager
def _pooled_layers_initialised_on(device):
    """Build-time shortcut for random presets: the layers `build_stage` puts on the cpu (the
    pooled ones) get their seeded random values computed on `device` instead (hashing 6 B
    values on the cpu takes minutes); `pool_attach` then moves them into the pool and their
    device copies are freed. The values are those random_init gives anywhere; timed steps
    are unaffected."""
    import torch

    import energon.runner as runner_module
    from energon.runner import materialize

    original = runner_module.random_init

    def init(model, seed):
        for layer in model.layers:
            params = list(layer.parameters())
            if params and params[0].device.type == "cpu":
                dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
                materialize(layer, device, dtype)
        return original(model, seed)

    runner_module.random_init = init
    try:
        yield
    finally:
        runner_module.random_init = original


class PoolBenchWorker(PoolMember):
    """One worker of the bench: rank 0 hosts the model (a ModelRunner, rebuilt per mode) and
    borrows; rank 1 lends. The pool's calls (`pool_map`, ...) reach the runner while one exists,
    so its pooled layers find their leases, and this actor otherwise (link measurements)."""

    def __init__(self, device: str = "cpu"):
        import torch

        from energon.actors import actor_context

        self.rank = actor_context().rank
        self.runner = None
        if device == "cuda":
            self.device = torch.device("cuda", self.rank)
            torch.cuda.set_device(self.device)
            torch.empty(1, device=self.device)  # the context exists before anything is measured
        else:
            self.device = torch.device("cpu")

    # -- the pool's calls: to the runner while there is one ----------------------------------

    def _borrower(self) -> PoolMember:
        return self.runner if self.runner is not None else super()

    def pool_map(self, handle: dict) -> int:
        return self._borrower().pool_map(handle)

    def pool_unmap(self, lease: int) -> bool:
        return self._borrower().pool_unmap(lease)

    def pool_revoke(self, lease: int) -> bool:
        return self._borrower().pool_revoke(lease)

    def pool_state(self) -> dict:
        return self._borrower().pool_state()

    def pool_buffer(self, lease: int):
        return self._borrower().pool_buffer(lease)

    def pool_needs(self) -> list[int]:
        return self.runner.pool_needs() if self.runner is not None else []

    def pool_attach(self, leases: list[int]) -> dict:
        return self.runner.pool_attach(leases)

    def pool_report(self) -> dict:
        return self.runner.pool_report()

    # -- facts and ceilings --------------------------------------------------------------------

    def facts(self) -> dict:
        import torch

        cuda = self.device.type == "cuda"
        nccl = " nccl " + ".".join(map(str, torch.cuda.nccl.version())) if cuda else ""
        return {
            "rank": self.rank,
            "device": str(self.device),
            "card": torch.cuda.get_device_name(self.device) if cuda else card_name(),
            "torch": torch.__version__ + nccl,
            "gpus": torch.cuda.device_count() if cuda else 0,
        }

    def plan(self, model: str, dtype: str, budget: int | None, fraction: float) -> dict:
        """The model's sizes (built on meta) and the weight budget: `budget` bytes, or
        `fraction` of its weights."""
        import torch

        from energon.parallel.topology import Topology, init_parallel, use_parallel
        from energon.pool.offload import layer_bytes, param_bytes
        from energon.runner import pick_dtype

        spec = resolve(model)
        kind = pick_dtype(dtype, spec.config, self.device)
        state = init_parallel(Topology(1, 1), 0, None, self.device)
        with use_parallel(state), torch.device("meta"):
            meta = spec.model_class(spec.config)
        total = param_bytes(meta, kind)
        layers = [layer_bytes(m, kind) for m in meta.layers]
        matrices = sum(p.numel() for m in meta.layers for p in m.parameters() if p.dim() >= 2)
        return {
            "dtype": str(kind).removeprefix("torch."),
            "param_bytes": total,
            "num_layers": len(layers),
            "layer_bytes": max(layers),
            "matmul_params": matrices,
            "vocab_size": spec.config["vocab_size"],
            "budget": int(budget) if budget else int(total * fraction),
        }

    def limits(self, dtype: str, matmul_size: int, copy_bytes: int) -> dict:
        """This card: {"matmul_flops", "hbm_bytes_per_s" (device copy, read + written)}."""
        import torch

        from energon.bench.limits import copy_bandwidth, matmul_rate
        from energon.runner import DTYPES

        kind = DTYPES[dtype]
        out = {
            "matmul_flops": matmul_rate(self.device, kind, matmul_size),
            "hbm_bytes_per_s": copy_bandwidth(self.device, copy_bytes),
        }
        if self.device.type == "cuda":  # torch's own pinned buffer, for comparison
            from energon.bench.limits import _median_seconds

            host = torch.empty(copy_bytes, dtype=torch.uint8, pin_memory=True)
            local = torch.empty(copy_bytes, dtype=torch.uint8, device=self.device)
            seconds = _median_seconds(
                lambda: local.copy_(host, non_blocking=True), self.device, 3, 10
            )
            out["pinned_h2d_bytes_per_s"] = copy_bytes / seconds
            del host, local
            torch.cuda.empty_cache()
        return out

    def link_bandwidth(self, lease: int, nbytes: int, warmup: int = 3, repeat: int = 10) -> dict:
        """Bytes/s (each byte counted once) of copying `nbytes` between a borrowed region and
        this device: {"to_device": region -> here (the staging copies' way), "from_device"}."""
        import torch

        from energon.bench.limits import _median_seconds

        region = self.pool_buffer(lease)[:nbytes]
        local = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        local.random_(0, 255, generator=torch.Generator(self.device).manual_seed(1))
        back = _median_seconds(
            lambda: region.copy_(local, non_blocking=True), self.device, warmup, repeat
        )
        there = _median_seconds(
            lambda: local.copy_(region, non_blocking=True), self.device, warmup, repeat
        )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"to_device": nbytes / there, "from_device": nbytes / back}

    # -- the model ---------------------------------------------------------------------------

    def build(self, model: str, dtype: str, seed: int, pool: dict | None) -> dict:
        """A ModelRunner on this device; with `pool` ({"mode", "budget"}) its layers beyond the
        budget wait for `pool_attach` (the controller borrows their leases)."""
        import torch

        from energon.bench.limits import synchronize
        from energon.runner import ModelRunner

        self.drop()
        t0 = time.perf_counter()
        shortcut = (
            _pooled_layers_initialised_on(self.device)
            if pool and self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with shortcut:
            self.runner = ModelRunner(
                model, dtype=dtype, device=str(self.device), seed=seed, rank=0, pool=pool
            )
        synchronize(self.device)
        stage = self.runner.offload
        return {
            "build_s": time.perf_counter() - t0,
            "pooled_layers": list(stage.indices) if stage else [],
            "dtype": str(self.runner.dtype).removeprefix("torch."),
            "param_bytes": sum(
                p.numel() * p.element_size()
                for p in {id(p): p for p in self.runner.model.parameters()}.values()
            ),
            "cuda": torch.cuda.is_available(),
        }

    def memory(self) -> dict:
        """The runner's memory() after dropping cached blocks (what its tensors hold)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self.runner.memory()

    def time_prefill(self, token_lists: list[list[int]], warmup: int, repeat: int) -> list[float]:
        """Seconds of padding-free forwards (last-token logits), inputs built in the timed
        region, each ended by a device synchronise."""
        from energon.bench.limits import synchronize
        from energon.bench.timed_runner import packed_step

        r = self.runner
        samples = []
        for i in range(warmup + repeat):
            synchronize(r.device)
            t0 = time.perf_counter()
            input_ids, meta = packed_step(token_lists, r.device)
            r._run(input_ids, meta)
            synchronize(r.device)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
        return samples

    def time_decode(
        self, batch: int, context: int, block_size: int, warmup: int, repeat: int, seed: int
    ) -> dict:
        """Decode steps of `batch` sequences, each with `context` cached tokens (seeded random
        K/V) and one new token: {"seconds": [...], "kv_bytes" (read per step)}. The cache is
        dropped afterwards."""
        import torch

        from energon.bench.limits import synchronize
        from energon.parallel.attention import Attention

        r = self.runner
        per_seq = -(-(context + 1) // block_size)
        r.init_kv_cache(batch * per_seq, block_size)
        g = torch.Generator(r.device).manual_seed(seed)
        layers = [m for m in r.model.modules() if isinstance(m, Attention)]
        for attn in layers:
            attn.kv_cache.normal_(0.0, 1.0, generator=g)
        vocab = r.spec.config["vocab_size"]
        rng = random.Random(seed)
        step = {
            "input_ids": [rng.randrange(4, vocab) for _ in range(batch)],
            "query_lens": [1] * batch,
            "context_lens": [context + 1] * batch,
            "block_tables": [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(batch)],
            "logits_indices": "last",
        }
        samples = []
        for i in range(warmup + repeat):
            synchronize(r.device)
            t0 = time.perf_counter()
            r.execute_logits(step)
            synchronize(r.device)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
        elsize = torch.empty((), dtype=r.dtype).element_size()
        per_token = sum(2 * a.num_kv_heads * a.head_dim for a in layers) * elsize
        kv_read = per_token * batch * (context + 1)
        for attn in layers:
            attn.kv_cache = None
        r.kv_cache_bytes = 0
        if r.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"seconds": samples, "kv_bytes": kv_read}

    def copy_seconds(self, repeat: int) -> list[float]:
        """One step's pooled copies with nothing to hide behind (OffloadedStage.measure_copy)."""
        stage = self.runner.offload
        return [stage.measure_copy() for _ in range(repeat)] if stage else []

    def drop(self) -> None:
        """Frees the runner (its leases must be returned first: Pool.close)."""
        import torch

        if self.runner is not None:
            if self.runner.offload is not None:
                self.runner.offload.close()
            # PoolMember registers its lease book with atexit, and the book keeps the runner's
            # revoke listener: without this the runner (and its GPU tensors) would outlive it
            side = self.runner.__dict__.get("_pool_side")
            if side is not None:
                side.listeners.clear()
            self.runner = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the baseline: Hugging Face transformers + accelerate device_map offload --------------

    def hf_offload(
        self,
        model: str,
        dtype: str,
        budget: int,
        token_lists: list[list[int]],
        decode: dict,
        warmup: int,
        repeat: int,
        seed: int,
    ) -> dict:
        """transformers' model of the same config, random weights, dispatched by accelerate with
        max_memory {0: budget, "cpu": ...} (the layers beyond it offloaded to the cpu and moved
        in at each forward), timed on the same prefill and decode step. {"skipped": why} when
        transformers or accelerate is missing."""
        try:
            import accelerate as acc
            import transformers as tr
        except ImportError as e:
            return {"skipped": f"accelerate/transformers not installed here ({e})"}
        import torch

        from energon.bench.limits import synchronize
        from energon.runner import DTYPES

        self.drop()
        t0 = time.perf_counter()
        hf, device_map = _hf_dispatched(model, DTYPES[dtype], budget, self.device, seed)
        build_s = time.perf_counter() - t0
        main = self.device
        places = list(device_map.values())
        ids = torch.tensor(token_lists, dtype=torch.int64, device=main)
        prefill = []
        with torch.inference_mode():
            for i in range(warmup + repeat):
                synchronize(main)
                t0 = time.perf_counter()
                hf(input_ids=ids, use_cache=False, logits_to_keep=1)
                synchronize(main)
                if i >= warmup:
                    prefill.append(time.perf_counter() - t0)
            del ids
            cache = _hf_random_cache(hf, decode["batch"], decode["context"], main, seed)
            rng = random.Random(seed)
            vocab = hf.config.vocab_size
            new = torch.tensor(
                [[rng.randrange(4, vocab)] for _ in range(decode["batch"])], device=main
            )
            mask = torch.ones(
                decode["batch"], decode["context"] + 1, dtype=torch.int64, device=main
            )
            steps = []
            for i in range(warmup + repeat):
                synchronize(main)
                t0 = time.perf_counter()
                hf(
                    input_ids=new,
                    attention_mask=mask,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                synchronize(main)
                if i >= warmup:
                    steps.append(time.perf_counter() - t0)
                cache.crop(-1)  # back to `context` cached tokens
        del hf, cache
        gc.collect()
        if main.type == "cuda":
            torch.cuda.empty_cache()
        return {
            "prefill_s": prefill,
            "decode_s": steps,
            "build_s": build_s,
            "layers_on_gpu": sum(
                1
                for k, v in device_map.items()
                if ".layers." in f"{k}." and v not in ("cpu", "disk")
            ),
            "layers_offloaded": sum(
                1 for k, v in device_map.items() if ".layers." in f"{k}." and v in ("cpu", "disk")
            ),
            "places": sorted({str(p) for p in places}),
            "versions": f"transformers {tr.__version__}, accelerate {acc.__version__}",
        }

    def close(self) -> None:
        self.drop()


def _placement(device_map: dict, name: str):
    """The device the longest matching device_map prefix gives parameter `name`."""
    best, where = -1, None
    for key, dev in device_map.items():
        if (key == "" or name == key or name.startswith(key + ".")) and len(key) > best:
            best, where = len(key), dev
    return where


def _hf_dispatched(model: str, dtype, budget: int, device, seed: int):
    """(transformers model with seeded random weights dispatched by accelerate, device_map).

    On cuda the map comes from accelerate's infer_auto_device_map with max_memory {index:
    budget, "cpu": ...}, what `from_pretrained(device_map="auto", max_memory=...)` uses; values
    are drawn on the GPU and those placed on the cpu copied there (pageable, as a checkpoint
    load leaves them). On a cpu run everything stays on the cpu (no offload to measure)."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(resolve(model).config)
    config.pop("architectures", None)
    config.pop("torch_dtype", None)
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    with init_empty_weights():
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    hf.tie_weights()
    no_split = list(getattr(hf, "_no_split_modules", None) or [])
    if device.type == "cuda":
        max_memory = {device.index: budget, "cpu": 4 * budget + 64 * GiB}
        device_map = dict(
            infer_auto_device_map(
                hf, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype
            )
        )
    else:
        device_map = {"": "cpu"}
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in list(hf.named_parameters()):
            if p.dim() >= 2:
                value = torch.randn(p.shape, dtype=dtype, device=device, generator=g).mul_(0.02)
            else:
                value = torch.full(
                    p.shape, 0.0 if name.endswith("bias") else 1.0, dtype=dtype, device=device
                )
            set_module_tensor_to_device(hf, name, _placement(device_map, name), value=value)
            del value
    hf.tie_weights()
    hf.eval()
    hf = dispatch_model(hf, device_map=device_map, skip_keys="past_key_values")
    return hf, device_map


def _hf_random_cache(hf, batch: int, context: int, device, seed: int):
    """A DynamicCache holding `context` tokens of seeded random K/V for `batch` sequences."""
    import torch
    from transformers import DynamicCache

    cfg = hf.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator(device).manual_seed(seed)
    cache = DynamicCache(config=cfg)
    dtype = next(p.dtype for p in hf.parameters() if p.is_floating_point())
    for layer in range(cfg.num_hidden_layers):
        k, v = (
            torch.randn(batch, heads, context, head_dim, dtype=dtype, device=device, generator=g)
            for _ in range(2)
        )
        cache.update(k, v, layer)
    return cache


# --------------------------------------------------------------------------- the controller


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, tp=None)
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}"
    )
    parser.add_argument("--budget", type=int, default=None, help="weight budget of GPU 0, bytes")
    parser.add_argument(
        "--budget-fraction", type=float, default=0.5, help="else this share of the weights (0.5)"
    )
    parser.add_argument("--prefill-seqs", type=int, default=32)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--decode-seqs", type=int, default=64)
    parser.add_argument("--context", type=int, default=512, help="cached tokens per sequence")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="timed prefills per mode")
    parser.add_argument("--decode-repeat", type=int, default=10, help="timed decode steps")
    parser.add_argument("--hf-warmup", type=int, default=1, help="accelerate: untimed passes")
    parser.add_argument("--hf-repeat", type=int, default=2, help="accelerate: timed passes")
    parser.add_argument(
        "--hf-prefill-seqs", type=int, default=0, help="accelerate prefill batch (0: the same)"
    )
    parser.add_argument("--link-bytes", type=int, default=0, help="0: 1 GiB on cuda, 64 MiB cpu")
    parser.add_argument("--seed", type=int, default=0)


def make_prompts(vocab: int, seqs: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(length)] for _ in range(seqs)]


async def _link(group, mode: str, nbytes: int) -> dict:
    """Borrow `nbytes` for worker 0 in `mode` ("peer" | "host") and time copies over it."""
    from energon.pool.allocator import Pool

    pool = Pool(group, mode)
    try:
        lease = await pool.borrow(nbytes, near=0)
        out = await group[0].call("link_bandwidth", lease.id, nbytes)
        out["where"] = lease.where
        return out
    finally:
        await pool.close()


async def _energon_mode(group, args, mode: str, plan: dict, prompts, say) -> dict:
    """Build, pool (peer / host), time prefill, copies and decode; returns the raw figures."""
    from energon.pool.allocator import pool_weights

    options = None if mode == "resident" else {"mode": mode, "budget": plan["budget"]}
    built = await group[0].call("build", args.model, args.dtype, args.seed, options)
    pool = None
    out: dict = {"build": built}
    try:
        if options is not None:
            t0 = time.perf_counter()
            pool = await pool_weights(group, mode)
            out["attach_s"] = time.perf_counter() - t0
            out["report"] = await group[0].call("pool_report")
            stats = pool.stats() if pool is not None else {}
            out["leases"] = stats.get("leases", 0)
            wheres = sorted({x.where for x in pool.leases.values()}) if pool else []
            out["where"] = wheres
            say(
                f"  {mode}: {len(built['pooled_layers'])} of {plan['num_layers']} layers pooled "
                f"({out['report']['pooled_bytes'] / GiB:.2f} GiB in {', '.join(wheres)}), "
                f"staging {out['report']['staging_bytes'] / GiB:.2f} GiB, build "
                f"{built['build_s']:.1f} s, borrow+attach {out['attach_s']:.1f} s"
            )
        out["memory"] = await group[0].call("memory")
        out["prefill_s"] = await group[0].call("time_prefill", prompts, args.warmup, args.repeat)
        say(f"  {mode}: prefill {statistics.median(out['prefill_s']):.4f} s")
        out["copy_s"] = await group[0].call("copy_seconds", 5)
        decode = await group[0].call(
            "time_decode",
            args.decode_seqs,
            args.context,
            args.block_size,
            args.warmup,
            args.decode_repeat,
            args.seed,
        )
        out["decode_s"], out["kv_bytes"] = decode["seconds"], decode["kv_bytes"]
        say(f"  {mode}: decode step {statistics.median(out['decode_s']) * 1e3:.2f} ms")
    finally:
        if pool is not None:
            await pool.close()
        await group[0].call("drop")
    return out


async def measure(args, device: str, say=print) -> dict:
    """Spawns the two workers and measures everything; returns the raw figures."""
    from energon.actors import ActorGroup

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    group = await ActorGroup.spawn(
        ACTOR,
        2,
        kwargs={"device": device},
        env=CHILD_ENV,
        heartbeat_timeout=120.0,
        start_timeout=600.0,
    )
    raw: dict = {"modes": {}, "skipped": {}}
    try:
        raw["facts"] = await group.broadcast("facts")
        plan = await group[0].call(
            "plan", args.model, args.dtype, args.budget, args.budget_fraction
        )
        raw["plan"] = plan
        say(
            f"{args.model} ({plan['dtype']}): {plan['param_bytes'] / GiB:.2f} GiB of weights, "
            f"{plan['num_layers']} layers of {plan['layer_bytes'] / GiB:.3f} GiB; weight budget "
            f"of worker 0: {plan['budget'] / GiB:.2f} GiB"
        )
        cuda = device == "cuda"
        link_bytes = args.link_bytes or (GiB if cuda else 64 << 20)
        raw["matmul_size"] = pick_matmul_size(args, device)
        raw["limits"] = await group[0].call("limits", plan["dtype"], raw["matmul_size"], link_bytes)
        raw["link_bytes"] = link_bytes
        raw["links"] = {}
        for mode in ("peer", "host"):
            if mode == "peer" and not cuda:
                raw["skipped"]["peer-link"] = "needs 2 GPUs"
                continue
            try:
                raw["links"][mode] = await _link(group, mode, link_bytes)
            except Exception as e:  # noqa: BLE001 - a missing lender skips its rows, says why
                raw["skipped"][f"{mode}-link"] = f"{type(e).__name__}: {e}"
        say(
            "ceilings: "
            + ", ".join(
                f"{m} link {v['to_device'] / 1e9:.1f} GB/s to GPU 0 ({v['from_device'] / 1e9:.1f}"
                f" back)"
                for m, v in raw["links"].items()
            )
            + f", device copy {raw['limits']['hbm_bytes_per_s'] / 1e9:.0f} GB/s, matmul "
            f"{raw['limits']['matmul_flops'] / 1e12:.1f} TFLOP/s"
        )
        prompts = make_prompts(plan["vocab_size"], args.prefill_seqs, args.prefill_len, args.seed)
        for mode in modes:
            if mode == "accelerate":
                continue
            if mode == "peer" and not cuda:
                raw["skipped"][mode] = "pooled-peer needs 2 GPUs (this run is on the cpu)"
                say(f"  skip {mode}: {raw['skipped'][mode]}")
                continue
            try:
                raw["modes"][mode] = await _energon_mode(group, args, mode, plan, prompts, say)
            except Exception as e:  # noqa: BLE001 - the other modes still run; the row says why
                raw["skipped"][mode] = f"{type(e).__name__}: {e}"
                say(f"  skip {mode}: {raw['skipped'][mode]}")
        if "accelerate" in modes:
            seqs = args.hf_prefill_seqs or args.prefill_seqs
            decode = {"batch": args.decode_seqs, "context": args.context}
            try:
                hf = await group[0].call(
                    "hf_offload",
                    args.model,
                    plan["dtype"],
                    plan["budget"],
                    prompts[:seqs],
                    decode,
                    args.hf_warmup,
                    args.hf_repeat,
                    args.seed,
                )
            except Exception as e:  # noqa: BLE001 - the Energon rows are kept; the row says why
                hf = {"skipped": f"{type(e).__name__}: {e}"}
            if "skipped" in hf:
                raw["skipped"]["accelerate"] = hf["skipped"]
                say(f"  skip accelerate: {hf['skipped']}")
            else:
                hf["prefill_seqs"] = seqs
                raw["modes"]["accelerate"] = hf
                say(
                    f"  accelerate: {hf['layers_on_gpu']} layers on GPU 0, "
                    f"{hf['layers_offloaded']} offloaded; prefill "
                    f"{statistics.median(hf['prefill_s']):.3f} s ({seqs} seqs), decode step "
                    f"{statistics.median(hf['decode_s']) * 1e3:.1f} ms"
                )
        await group.broadcast("close")
    finally:
        await group.shutdown()
    return raw


def _spread(xs: list[float], scale: float = 1.0, fmt: str = ".4g") -> str:
    return f"{min(xs) * scale:{fmt}}-{max(xs) * scale:{fmt}}"


def build_records(args, raw: dict) -> list[Record]:
    """One record per measured point (BENCHMARKS.md): ceilings, then per mode prefill and
    decode against their baselines and floors, and the pooled copies' achieved bandwidth."""
    facts, plan, limits = raw["facts"][0], raw["plan"], raw["limits"]
    cuda = facts["device"].startswith("cuda")
    tokens = args.prefill_seqs * args.prefill_len
    common = dict(
        scenario=SCENARIO,
        model=args.model,
        dtype=plan["dtype"],
        tp=1,
        pp=1,
        card=facts["card"],
        torch=facts["torch"],
    )
    prefill_shape = dict(batch=args.prefill_seqs, prompt_len=args.prefill_len, gen_len=0)
    decode_shape = dict(batch=args.decode_seqs, prompt_len=args.context, gen_len=1)
    budget_note = (
        f"weight budget of GPU 0 {plan['budget'] / GiB:.2f} GiB of {plan['param_bytes'] / GiB:.2f}"
        f" GiB ({plan['budget'] / plan['param_bytes']:.0%})"
    )
    records: list[Record] = []
    links = raw["links"]
    for mode, link in links.items():
        what = "peer GPU (CUDA IPC lease of GPU 1)" if mode == "peer" else "pinned host (shm lease)"
        for way, label in (("to_device", "to GPU 0"), ("from_device", "from GPU 0")):
            records.append(
                Record(
                    metric=f"{mode}_link_bandwidth_{way}",
                    unit="GB/s",
                    value=link[way] / 1e9,
                    n_gpus=2 if mode == "peer" else int(cuda),
                    notes=f"{what} {label}, {raw['link_bytes'] / GiB:.2f} GiB copies over a real "
                    f"pool lease ({link['where']}), bytes counted once, median of 10",
                    **common,
                )
            )
    records.append(
        Record(
            metric="hbm_copy_bandwidth",
            unit="GB/s",
            value=limits["hbm_bytes_per_s"] / 1e9,
            n_gpus=int(cuda),
            notes="device-to-device copy on GPU 0, bytes read + written",
            **common,
        )
    )
    if "pinned_h2d_bytes_per_s" in limits:
        records.append(
            Record(
                metric="pinned_h2d_bandwidth",
                unit="GB/s",
                value=limits["pinned_h2d_bytes_per_s"] / 1e9,
                n_gpus=1,
                notes="torch pinned buffer (pin_memory=True) to GPU 0, bytes counted once",
                **common,
            )
        )
    records.append(
        Record(
            metric="matmul_rate",
            unit="TFLOP/s",
            value=limits["matmul_flops"] / 1e12,
            n_gpus=int(cuda),
            notes=f"{raw['matmul_size']}^3 {plan['dtype']} on GPU 0",
            **common,
        )
    )
    modes = raw["modes"]
    res, hf = modes.get("resident"), modes.get("accelerate")
    skipped = raw["skipped"]
    prefill_ceiling = limits["matmul_flops"] / (2 * plan["matmul_params"])  # tokens/s
    med = statistics.median

    def rate(m) -> float:
        return tokens / med(m["prefill_s"])

    hf_rate = None
    if hf:
        hf_rate = hf["prefill_seqs"] * args.prefill_len / med(hf["prefill_s"])
    hf_step = med(hf["decode_s"]) if hf else None
    hf_note = (
        f"accelerate device_map offload ({hf['versions']}): max_memory GPU 0 = the same budget, "
        f"{hf['layers_on_gpu']} decoder layers on GPU 0 and {hf['layers_offloaded']} on the cpu "
        f"(moved in at every forward), {args.hf_warmup} warm-up + {len(hf['prefill_s'])} timed; "
        f"prefill {hf['prefill_seqs']} x {args.prefill_len} tokens "
        f"{_spread(hf['prefill_s'])} s, decode {_spread(hf['decode_s'], 1e3)} ms"
        if hf
        else f"accelerate row skipped: {skipped.get('accelerate', 'not requested')}"
    )
    if hf and hf["prefill_seqs"] != args.prefill_seqs:
        hf_note += (
            f"; its prefill ran {hf['prefill_seqs']} sequences instead of {args.prefill_seqs} "
            "(tokens/s compared; the offload copies are per forward, so a smaller batch "
            "flatters its tokens/s)"
        )

    def vs_hf_rate(value: float) -> dict:
        return dict(
            baseline_name="accelerate-offload",
            baseline_value=hf_rate,
            ratio=value / hf_rate if hf_rate else None,
        )

    def vs_hf_step(value: float) -> dict:
        return dict(
            baseline_name="accelerate-offload",
            baseline_value=hf_step * 1e3 if hf_step else None,
            ratio=hf_step / value if hf_step else None,
        )

    res_step = med(res["decode_s"]) if res else None
    for mode in ("resident", "peer", "host"):
        m = modes.get(mode)
        if m is None:
            continue
        label = "resident" if mode == "resident" else f"pooled_{mode}"
        n_gpus = (2 if mode == "peer" else 1) if cuda else 0
        value = rate(m)
        step = med(m["decode_s"])
        report = m.get("report") or {}
        pooled = report.get("pooled_bytes", 0)
        mem = m.get("memory", {})
        held = mem.get("allocated_bytes")
        where = (
            f"{len(m['build']['pooled_layers'])} of {plan['num_layers']} layers pooled "
            f"({pooled / GiB:.2f} GiB in {', '.join(m.get('where', []))}), staging "
            f"{report.get('staging_bytes', 0) / GiB:.2f} GiB"
            if mode != "resident"
            else "every layer on GPU 0"
        )
        if held is not None:
            where += f"; GPU 0 holds {held / GiB:.2f} GiB of tensors after loading"
        base = f"{budget_note}; {where}; " if mode != "resident" else f"{where}; "
        prefill_note = (
            base + f"prefill {args.prefill_seqs} x {args.prefill_len} tokens, one padding-free "
            f"forward, last-token logits; median of {len(m['prefill_s'])} after {args.warmup} "
            f"warm-ups ({_spread(m['prefill_s'])} s); ceiling = matmul rate / (2 x "
            f"{plan['matmul_params']} decoder matrix params)"
        )
        # prefill: pooled against resident (goal >= 0.9), every mode against accelerate (>= 5)
        if mode != "resident" and res:
            records.append(
                Record(
                    metric=f"prefill_throughput_{label}",
                    unit="tokens/s",
                    value=value,
                    baseline_name="resident",
                    baseline_value=rate(res),
                    ratio=value / rate(res),
                    limit_value=prefill_ceiling,
                    of_limit=value / prefill_ceiling,
                    n_gpus=n_gpus,
                    notes=prefill_note,
                    **prefill_shape,
                    **common,
                )
            )
        records.append(
            Record(
                metric=f"prefill_throughput_{label}",
                unit="tokens/s",
                value=value,
                limit_value=prefill_ceiling,
                of_limit=value / prefill_ceiling,
                n_gpus=n_gpus,
                notes=prefill_note + "; " + hf_note,
                **vs_hf_rate(value),
                **prefill_shape,
                **common,
            )
        )
        # decode: floor = resident bytes / HBM for resident; max(resident step, pooled / link)
        if mode == "resident":
            read = plan["param_bytes"] + m["kv_bytes"]
            floor = read / limits["hbm_bytes_per_s"]
            floor_note = (
                f"floor = (weights {plan['param_bytes'] / GiB:.2f} GiB + KV read "
                f"{m['kv_bytes'] / GiB:.2f} GiB) / device copy bandwidth"
            )
        else:
            link = links.get(mode)
            bw = link["to_device"] if link else None
            floor = max(res_step or 0.0, pooled / bw if bw else 0.0)
            floor_note = (
                f"floor = max(resident step {res_step * 1e3 if res_step else float('nan'):.2f} "
                f"ms, pooled {pooled / GiB:.2f} GiB / {mode} link "
                f"{bw / 1e9 if bw else float('nan'):.1f} GB/s = "
                f"{pooled / bw * 1e3 if bw else float('nan'):.2f} ms)"
            )
        decode_note = (
            base + f"decode step: {args.decode_seqs} sequences x 1 new token at a "
            f"{args.context}-token context (paged KV, block {args.block_size}, seeded random "
            f"K/V), median of {len(m['decode_s'])} after {args.warmup} warm-ups "
            f"({_spread(m['decode_s'], 1e3)} ms); {floor_note}"
        )
        records.append(
            Record(
                metric=f"decode_step_time_{label}",
                unit="ms",
                value=step * 1e3,
                limit_value=floor * 1e3,
                of_limit=floor / step,
                n_gpus=n_gpus,
                notes=decode_note + "; " + hf_note,
                **vs_hf_step(step),
                **decode_shape,
                **common,
            )
        )
        if mode != "resident" and res_step:
            records.append(
                Record(
                    metric=f"decode_step_time_{label}",
                    unit="ms",
                    value=step * 1e3,
                    baseline_name="resident",
                    baseline_value=res_step * 1e3,
                    ratio=res_step / step,
                    limit_value=floor * 1e3,
                    of_limit=floor / step,
                    n_gpus=n_gpus,
                    notes=decode_note,
                    **decode_shape,
                    **common,
                )
            )
        # the pooled copies' bandwidth against the link's measured peak
        link = links.get(mode)
        if mode != "resident" and pooled and link:
            peak = link["to_device"] / 1e9
            copy = med(m["copy_s"]) if m.get("copy_s") else None
            for metric, seconds, what in (
                (
                    "pooled_copy_bandwidth_unhidden",
                    copy,
                    "one step's pooled copies alone "
                    f"(OffloadedStage.measure_copy, median of {len(m.get('copy_s', []))})",
                ),
                ("pooled_copy_bandwidth_decode", step, "pooled bytes / decode step time"),
                (
                    "pooled_copy_bandwidth_prefill",
                    med(m["prefill_s"]),
                    "pooled bytes / prefill time (compute-bound: the link idles)",
                ),
            ):
                if not seconds:
                    continue
                achieved = pooled / seconds / 1e9
                records.append(
                    Record(
                        metric=f"{metric}_{label}",
                        unit="GB/s",
                        value=achieved,
                        limit_value=peak,
                        of_limit=achieved / peak,
                        n_gpus=n_gpus,
                        notes=f"{pooled / GiB:.2f} GiB per step; {what}; limit = the {mode} "
                        f"link's measured peak to GPU 0",
                        **common,
                    )
                )
    return records


def print_table(records: list[Record], raw: dict) -> None:
    print_records(records)
    for what, why in raw["skipped"].items():
        print(f"skipped {what}: {why}")
    print(
        "goals: prefill pooled-peer / resident >= 0.9; decode pooled of_limit >= 0.87 (within "
        "1.15x of max(resident step, pooled bytes / link)); both >= 5x accelerate-offload"
    )
    print(f"card: {records[0].card if records else '?'}")


def main(args: argparse.Namespace) -> int:
    os.environ.update(CHILD_ENV)
    gpus = visible_gpus()
    device = resolve_device(args.device, gpus)
    if device == "cuda" and gpus < 2:
        print(f"note: {gpus} GPU(s) visible; the peer rows need 2", file=sys.stderr)
        if gpus < 1:
            return 1
    print(f"energon bench pool: {args.model} on {device}, modes {args.modes}", flush=True)

    def say(line: str) -> None:
        print(line, flush=True)

    raw = asyncio.run(measure(args, device, say))
    records = build_records(args, raw)
    if not records:
        print("nothing measured", file=sys.stderr)
        return 1
    print_table(records, raw)
    path = write_results(SCENARIO, records, args.out)
    print(f"wrote {path}")
    return 0
