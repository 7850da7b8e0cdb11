"""`energon bench paged-attention`: one decode attention layer over the paged KV cache.

The Triton kernel (`energon.parallel.paged_attention`) against the grid path of `Attention`
(gather every sequence's cached K/V into dense [B, context, Hkv, D] tensors, then SDPA), on
opt-13b's attention shapes by default: 40 heads, head_dim 128, fp16, block size 16, block tables
shuffled over the pool. Every sequence has one new token and the same context length.

Each path is timed with CUDA events around single calls, queued behind a sleep kernel so the
intervals hold GPU time only (no host launch gaps), with a 256 MiB write between calls so the
cache is read from HBM, not L2; the median is reported. Floor = K and V bytes read / copy
bandwidth (a device-to-device copy measured in the same run, bytes read + written).
`--configs` adds kernel-only timings of other tile sizes / warps / splits (printed, and kept in
the notes). Both paths exclude the cache write of the new token, which they share; `forward`
rows time the whole `Attention.forward` (cache write included) down each path.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

import torch

from energon.bench.limits import copy_bandwidth
from energon.bench.record import Record, copy_bandwidth_record, write_results

SCENARIO = "paged-attention"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", default="1,64,256", help="comma-separated batch sizes")
    parser.add_argument("--contexts", default="512,2048", help="comma-separated context lengths")
    parser.add_argument(
        "--max-context",
        type=int,
        default=0,
        help="max_context_len given to the kernel (0: the context itself); the Engine's decode "
        "CUDA graphs give the model's longest context, e.g. 2048",
    )
    parser.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        help="keys every sequence shares (its first blocks are the same cached blocks, as with "
        "prefix caching): also time the kernel reading them once (kernel_shared rows)",
    )
    parser.add_argument(
        "--prefix-configs",
        default="",
        help="with --shared-prefix: configs of the pass over the shared prefix, "
        "parts:block_n:num_warps (parts 0 = default), e.g. '2:64:4,4:128:8'",
    )
    parser.add_argument(
        "--configs",
        default="",
        help="extra kernel configs block_n:num_warps:splits (splits 0 = default), e.g. "
        "'32:4:0,128:4:0,64:8:0,64:4:1'; with --shared-prefix timed with the groups too",
    )
    add_layer_arguments(parser)


def add_layer_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of an attention-layer bench (this one, paged-prefill): the layer's shape
    (opt-13b's by default), timing, and where results go."""
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--kv-heads", type=int, default=0, help="0: as many as --heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--alibi", action="store_true", help="ALiBi slopes on (opt-13b: off)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--copy-mib", type=int, default=1024, help="copy bandwidth buffer")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")


class Timer:
    """Median seconds of single calls: CUDA events behind a sleep kernel, L2 flushed between."""

    def __init__(self, device: torch.device, warmup: int, repeat: int):
        self.device, self.warmup, self.repeat = device, warmup, repeat
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(
            256 << 20 if self.cuda else 1 << 20, dtype=torch.uint8, device=device
        )

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            samples = []
            for _ in range(self.repeat):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            return statistics.median(samples)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(self.repeat)
        ]
        torch.cuda.synchronize(self.device)
        torch.cuda._sleep(100_000_000)  # ~50 ms: the host queues every call before the GPU runs
        for start, end in events:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


def make_layer(
    args,
    batch: int,
    context: int,
    device: torch.device,
    dtype: torch.dtype,
    new: int = 1,
    shared: int = 0,
):
    """An Attention with a random cache of `batch` sequences of `context` keys (shuffled
    blocks) and a step's q/k/v [batch x new, heads x head_dim] and meta: `new` tokens of each
    sequence at the end of its context (1: a decode step). The first `shared` keys' blocks
    (whole blocks) are the same for every sequence, as a cached prefix's are."""
    from energon.parallel.attention import Attention, alibi_slopes
    from energon.parallel.packing import BatchMeta

    H, D, bs = args.heads, args.head_dim, args.block_size
    Hkv = args.kv_heads or H
    common = shared // bs
    per_seq = -(-context // bs) - common
    num_blocks = common + batch * per_seq + 1
    pool = list(range(num_blocks))
    random.Random(batch * 100_003 + context).shuffle(pool)
    prefix, pool = pool[:common], pool[common:]
    tables = [prefix + pool[i * per_seq : (i + 1) * per_seq] for i in range(batch)]
    slopes = alibi_slopes(H) if args.alibi else None
    attn = Attention(H, Hkv, D, D**-0.5, alibi_slopes=slopes)
    g = torch.Generator(device=device).manual_seed(context + batch)
    attn.kv_cache = torch.randn(2, num_blocks, bs, Hkv, D, device=device, dtype=dtype, generator=g)
    meta = BatchMeta.for_step([new] * batch, [context] * batch, tables, bs, device=device)
    q = torch.randn(batch * new, H * D, device=device, dtype=dtype, generator=g)
    k = torch.randn(batch * new, Hkv * D, device=device, dtype=dtype, generator=g)
    v = torch.randn(batch * new, Hkv * D, device=device, dtype=dtype, generator=g)
    return attn, meta, q, k, v


def measure_shape(args, timer, batch, context, device, dtype, configs) -> dict:
    from energon.parallel.paged_attention import default_num_splits, paged_attention
    from energon.parallel.shared_prefix import find_shared_prefixes

    attn, meta, q, k, v = make_layer(args, batch, context, device, dtype, shared=args.shared_prefix)
    H, D = attn.num_heads, attn.head_dim
    q3 = q.view(batch, H, D)
    k3, v3 = (x.view(batch, attn.num_kv_heads, D) for x in (k, v))
    slopes = attn._device_slopes(device)
    max_context = max(args.max_context, context)

    def kernel(block_n=None, num_warps=None, num_splits=None, shared=None, prefix_config=None):
        return paged_attention(
            q3,
            attn.kv_cache,
            meta.block_tables,
            meta.context_lens,
            meta.cu_seqlens,
            meta.max_seqlen_q,
            max_context,
            attn.scale,
            alibi_slopes=slopes,
            block_n=block_n,
            num_warps=num_warps,
            num_splits=num_splits,
            shared=shared,
            prefix_config=prefix_config,
        )

    def grid():
        return attn._varlen(q3, k3, v3, meta, True)

    diff = (kernel().float() - grid().float()).abs().max().item()
    result = {
        "batch": batch,
        "context": context,
        "splits": default_num_splits(batch, attn.num_kv_heads, max_context, device),
        "kernel_s": timer(kernel),
        "grid_s": timer(grid),
        "max_abs_diff": diff,
        "kv_bytes": 2 * batch * context * attn.num_kv_heads * D * attn.kv_cache.element_size(),
        "configs": {},
        "configs_shared": {},
    }
    tables = meta.block_tables.cpu()
    groups = find_shared_prefixes([1] * batch, [context] * batch, tables, args.block_size)
    if groups is not None:  # the shared keys read once: the kernel with the groups
        groups = groups.to(device)
        diff = (kernel(shared=groups).float() - grid().float()).abs().max().item()
        result["kernel_shared_s"] = timer(lambda: kernel(shared=groups))
        result["max_abs_diff_shared"] = diff
        result["prefix_configs"] = {}
        for parts, block_n, warps in prefix_configs(args):
            name = f"{parts}:{block_n}:{warps}"
            config = dataclasses.replace(groups, parts=parts or None)
            result["prefix_configs"][name] = timer(
                lambda c=config, b=block_n, w=warps: kernel(shared=c, prefix_config=(b, w))
            )
        per_key = result["kv_bytes"] // (batch * context)
        result["kv_bytes_shared"] = per_key * (
            groups.max_prefix_len + batch * (context - groups.max_prefix_len)
        )
    for block_n, num_warps, splits in configs:
        name = f"{block_n}:{num_warps}:{splits}"
        try:
            result["configs"][name] = timer(
                lambda b=block_n, w=num_warps, s=splits: kernel(b, w, s or None)
            )
            if groups is not None:  # the same decode-kernel config after the prefix pass
                result["configs_shared"][name] = timer(
                    lambda b=block_n, w=num_warps, s=splits: kernel(b, w, s or None, groups)
                )
        except Exception as e:  # e.g. a tile too large for shared memory
            print(f"config {name} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    if device.type == "cuda":  # the whole layer call down each path, cache write included
        attn.use_flash = False
        result["forward_paged_s"] = timer(lambda: attn(q, k, v, meta))
        attn.use_paged = False
        result["forward_grid_s"] = timer(lambda: attn(q, k, v, meta))
    return result


def prefix_configs(args) -> list[tuple[int, int, int]]:
    """--prefix-configs as (parts, block_n, num_warps) triples."""
    return [tuple(int(p) for p in c.split(":")) for c in args.prefix_configs.split(",") if c]


def main(args: argparse.Namespace) -> int:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        print("no CUDA: timing on CPU (set TRITON_INTERPRET=1 to run the kernel; a smoke run)")
    dtype = getattr(torch, args.dtype)
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    configs = [tuple(int(p) for p in c.split(":")) for c in args.configs.split(",") if c]
    bandwidth = copy_bandwidth(device, (args.copy_mib if device.type == "cuda" else 16) << 20)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + written)", flush=True)
    timer = Timer(device, args.warmup, args.repeat)
    Hkv = args.kv_heads or args.heads
    shape = f"{args.heads} heads, {Hkv} KV heads, head_dim {args.head_dim}, block {args.block_size}"
    print(
        f"\n{'batch':>5} {'ctx':>5} {'splits':>6} {'kernel us':>10} {'grid us':>10} "
        f"{'ratio':>6} {'floor us':>9} {'of_floor':>8} {'fwd paged':>10} {'fwd grid':>10}  configs"
    )
    records, raw = [], []
    for batch in batches:
        for context in contexts:
            r = measure_shape(args, timer, batch, context, device, dtype, configs)
            raw.append(r)
            # with a shared prefix its blocks hold the same K/V for every sequence: the floor
            # reads each distinct byte once, whichever kernel runs
            distinct = r.get("kv_bytes_shared", r["kv_bytes"])
            shared_note = (
                f", the first {args.shared_prefix} keys the same blocks for every sequence"
                if "kv_bytes_shared" in r
                else ""
            )
            floor = distinct / bandwidth
            cfg = ", ".join(f"{n} {t * 1e6:.1f}" for n, t in r["configs"].items())
            fwd = (
                f"{r['forward_paged_s'] * 1e6:>10.1f} {r['forward_grid_s'] * 1e6:>10.1f}"
                if "forward_paged_s" in r
                else f"{'-':>10} {'-':>10}"
            )
            print(
                f"{batch:>5} {context:>5} {r['splits']:>6} {r['kernel_s'] * 1e6:>10.1f} "
                f"{r['grid_s'] * 1e6:>10.1f} {r['grid_s'] / r['kernel_s']:>6.2f} "
                f"{floor * 1e6:>9.1f} {floor / r['kernel_s']:>8.3f} {fwd}  {cfg}",
                flush=True,
            )
            notes = (
                f"one decode step (1 new token per sequence, context {context}"
                f"{shared_note}), {shape}, "
                f"{args.dtype}{', ALiBi' if args.alibi else ''}; Triton kernel "
                f"(block_n 64, 4 warps, {r['splits']} split(s), max_context_len "
                f"{max(args.max_context, context)}) vs Attention._varlen grid path, "
                f"both without the shared cache write; median CUDA-event time of "
                f"{args.repeat} single calls, L2 flushed; floor = {distinct / 1e6:.1f} MB "
                f"distinct K+V / {bandwidth / 1e9:.0f} GB/s copy bandwidth; max |kernel - grid| "
                f"{r['max_abs_diff']:.2e}"
            )
            if "forward_paged_s" in r:
                notes += (
                    f"; Attention.forward incl. cache write: paged {r['forward_paged_s'] * 1e6:.1f}"
                    f" us, grid {r['forward_grid_s'] * 1e6:.1f} us"
                )
            if cfg:
                notes += f"; kernel configs block_n:warps:splits us: {cfg}"
            records.append(
                layer_record(
                    args,
                    "decode_attention_layer",
                    r["kernel_s"],
                    batch,
                    context,
                    device,
                    baseline=("grid path (dense KV gather + SDPA)", r["grid_s"]),
                    floor=floor,
                    notes=notes,
                )  # fmt: skip
            )
            if "kernel_shared_s" in r:
                records.append(shared_record(args, r, batch, context, bandwidth, shape, device))
    records.append(copy_bandwidth_record(SCENARIO, bandwidth, int(device.type == "cuda")))
    path = write_results(SCENARIO, records, args.out)
    print(f"\nwrote {path}")
    return 0


def shared_record(args, r: dict, batch: int, context: int, bandwidth: float, shape, device):
    """The kernel reading the first --shared-prefix keys once for all sequences, against the
    same kernel reading them for each; floor = the distinct K/V bytes / copy bandwidth."""
    from energon.parallel.paged_attention import SHARED_CONFIG

    floor = r["kv_bytes_shared"] / bandwidth
    took, each = r["kernel_shared_s"], r["kernel_s"]
    print(
        f"{batch:>5} {context:>5} shared {args.shared_prefix}: {took * 1e6:.1f} us vs "
        f"{each * 1e6:.1f} us read for each ({each / took:.2f}x), floor {floor * 1e6:.1f} us "
        f"({floor / took:.3f}), max |diff| {r['max_abs_diff_shared']:.2e}",
        flush=True,
    )
    configs = ", ".join(f"{n} {t * 1e6:.1f}" for n, t in r["prefix_configs"].items())
    if configs:
        print(f"      prefix pass parts:block_n:warps us: {configs}", flush=True)
    kernel_configs = ", ".join(f"{n} {t * 1e6:.1f}" for n, t in r["configs_shared"].items())
    if kernel_configs:
        print(f"      decode kernel block_n:warps:splits us: {kernel_configs}", flush=True)
    return layer_record(
        args, "decode_attention_layer_shared_prefix", took, batch, context, device,
        baseline=("the same kernel reading the shared prefix for every sequence", each),
        floor=floor,
        notes=(
            f"one decode step, context {context} of which the first {args.shared_prefix} keys "
            f"are the same cached blocks for all {batch} sequences, {shape}, {args.dtype}"
            f"{', ALiBi' if args.alibi else ''}; the paged kernel with the step's groups (one "
            f"pass over the shared blocks, then each sequence's own keys, unsplit at 4+ "
            f"programs an SM in tiles block_n:warps:stages {':'.join(map(str, SHARED_CONFIG))})"
            f" vs without; floor = "
            f"{r['kv_bytes_shared'] / 1e6:.1f} MB distinct K+V / {bandwidth / 1e9:.0f} GB/s; "
            f"max |kernel with groups - grid path| {r['max_abs_diff_shared']:.2e}"
            + (f"; with prefix-pass configs parts:block_n:warps us: {configs}" if configs else "")
            + (
                f"; with decode-kernel configs block_n:warps:splits us: {kernel_configs}"
                if kernel_configs
                else ""
            )
        ),
    )  # fmt: skip


def layer_record(
    args,
    metric: str,
    seconds: float,
    batch: int,
    context: int,
    device,
    *,
    baseline,
    floor,
    notes,
    scenario: str = SCENARIO,
) -> Record:
    """A record of one attention layer's time (in us) against `baseline` (name, seconds) and
    the floor (seconds)."""
    name, base = baseline
    return Record(
        scenario=scenario,
        metric=metric,
        unit="us",
        value=seconds * 1e6,
        model="opt-13b attention shapes",
        dtype=args.dtype,
        batch=batch,
        prompt_len=context,
        gen_len=1,
        baseline_name=name,
        baseline_value=base * 1e6,
        ratio=base / seconds,
        limit_value=floor * 1e6,
        of_limit=floor / seconds,
        n_gpus=1 if device.type == "cuda" else 0,
        notes=notes,
    )
