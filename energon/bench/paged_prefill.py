"""`energon bench paged-prefill`: one attention layer of prompts that continue after cached keys.

The Triton prefill kernel (`energon.parallel.paged_prefill`) against the grid path of
`Attention` that such steps took before it (gather every sequence's cached K/V into dense
[B, context, Hkv, D] tensors, then SDPA with a mask), on opt-13b's attention shapes by default
(40 heads, head_dim 128, fp16, block size 16, block tables shuffled over the pool). A shape
`BxQ@C` is B sequences of Q new tokens each, at the end of a context of C keys (C - Q cached):
64x64@1088 is the step of `energon bench prefix` (64 suffixes after a cached 1,024-token
prefix), 1x2048@4096 the second chunk of a 4,096-token prompt. Also timed, for scale: torch's
flash varlen kernel on the same keys laid out contiguously (what the attention costs without
pages; its gather into that layout not counted).

Timing as `energon bench paged-attention` (CUDA events around single calls behind a sleep
kernel, L2 flushed between calls, median). Limit = max(FLOPs / matmul rate, bytes / copy
bandwidth), both measured in the same run: 4 x head_dim FLOPs per (query, visible key) pair
and head, and the K/V, queries and output read or written once. `--configs` adds kernel timings
of other tiles (block_m:block_n:warps:stages).
"""

from __future__ import annotations

import argparse

import torch

from energon.bench.limits import copy_bandwidth, matmul_rate
from energon.bench.paged_attention import Timer, add_layer_arguments, layer_record, make_layer
from energon.bench.record import Record, copy_bandwidth_record, write_results

SCENARIO = "paged-prefill"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes",
        default="64x64@1088,8x64@1088,1x512@2560,4x1024@2048,1x2048@4096",
        help="comma-separated BxQ@C: B sequences of Q new tokens after C - Q cached keys",
    )
    parser.add_argument(
        "--configs",
        default="",
        help="extra kernel configs block_m:block_n:num_warps:num_stages, e.g. '128:64:8:3'",
    )
    parser.add_argument("--matmul-size", type=int, default=8192, help="matmul rate probe")
    add_layer_arguments(parser)


def parse_shape(text: str) -> tuple[int, int, int]:
    """'BxQ@C' -> (B, Q, C); ValueError naming the shape unless 1 <= Q <= C."""
    try:
        head, context = text.split("@")
        batch, new = head.split("x")
        b, q, c = int(batch), int(new), int(context)
    except ValueError:
        raise ValueError(f"shape {text!r}: expected BxQ@C, e.g. 64x64@1088") from None
    if b < 1 or not 1 <= q <= c:
        raise ValueError(f"shape {text!r}: needs B >= 1 and 1 <= Q <= C")
    return b, q, c


def work(batch: int, new: int, context: int, heads: int, kv_heads: int, dim: int, elem: int):
    """(FLOPs, bytes) of the layer's attention: every query sees the keys up to its position."""
    visible = new * (context - new) + new * (new + 1) // 2  # (query, key) pairs per sequence
    flops = 4 * dim * heads * visible * batch
    kv = 2 * context * kv_heads * dim * elem * batch
    return flops, kv + 2 * batch * new * heads * dim * elem


def contiguous_flash(attn, meta, q, device):
    """torch's flash varlen kernel over each sequence's keys copied out of the pages (the
    copy made here, once): a reference for what the attention costs without pages; None where
    torch has no varlen_attn on this device."""
    from energon.parallel.attention import _causal_kwargs, _varlen_attn, flash_usable

    if not flash_usable(q, attn.alibi_slopes is not None, cached=False):
        return None
    B, ctx, bs = meta.num_seqs, meta.max_context_len, attn.kv_cache.shape[2]
    blocks = meta.block_tables[:, : -(-ctx // bs)].long()
    slots = (blocks[:, :, None] * bs + torch.arange(bs, device=device)).flatten(1)[:, :ctx]
    flat = attn.kv_cache.flatten(1, 2)
    keys, values = flat[0][slots].flatten(0, 1), flat[1][slots].flatten(0, 1)  # [B * ctx, ...]
    cu_k = torch.arange(B + 1, device=device, dtype=torch.int32) * ctx
    cu_q = meta.cu_seqlens.to(torch.int32)
    if attn.num_kv_heads != attn.num_heads:
        groups = attn.num_heads // attn.num_kv_heads
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    kwargs = {"scale": attn.scale, **_causal_kwargs()}
    return lambda: _varlen_attn(q, keys, values, cu_q, cu_k, meta.max_seqlen_q, ctx, **kwargs)


def cache_write_times(timer, kv_cache, k, v, slots) -> dict:
    """The step's new K/V into their slots: the Triton cache write (`cache_write_s`) against
    index_copy_, the path before it (`index_copy_s`)."""
    from energon.parallel.attention import index_copy_kv
    from energon.parallel.cache_write import write_kv

    index_copy_kv(kv_cache, k, v, slots)
    wanted = kv_cache.clone()
    write_kv(kv_cache, k, v, slots)
    if not torch.equal(kv_cache, wanted):
        raise RuntimeError("the cache write kernel and index_copy_ filled the cache differently")
    return {
        "cache_write_s": timer(lambda: write_kv(kv_cache, k, v, slots)),
        "index_copy_s": timer(lambda: index_copy_kv(kv_cache, k, v, slots)),
    }


def measure(args, timer, shape, device, dtype, configs) -> dict:
    from energon.parallel.paged_prefill import paged_prefill

    batch, new, context = shape
    attn, meta, q, k, v = make_layer(args, batch, context, device, dtype, new=new)
    q, k, v = (x.view(batch * new, -1, attn.head_dim) for x in (q, k, v))
    slopes = attn._device_slopes(device)

    def kernel(block_m=None, block_n=None, num_warps=None, num_stages=None):
        return paged_prefill(
            q,
            attn.kv_cache,
            meta.block_tables,
            meta.context_lens,
            meta.cu_seqlens,
            meta.max_seqlen_q,
            attn.scale,
            alibi_slopes=slopes,
            block_m=block_m,
            block_n=block_n,
            num_warps=num_warps,
            num_stages=num_stages,
        )

    def grid():
        return attn._varlen(q, k, v, meta, True)

    result = {
        "kernel_s": timer(kernel),
        "grid_s": timer(grid),
        **cache_write_times(timer, attn.kv_cache, k, v, meta.slot_mapping),
        "max_abs_diff": (kernel().float() - grid().float()).abs().max().item(),
        "configs": {},
    }
    flash = contiguous_flash(attn, meta, q, device)
    if flash is not None:
        result["flash_contiguous_s"] = timer(flash)
    for config in configs:
        name = ":".join(map(str, config))
        try:
            result["configs"][name] = timer(lambda c=config: kernel(*c))
        except Exception as e:  # e.g. a tile too large for shared memory
            print(f"config {name} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    return result


def cache_write_record(args, name, batch, new, context, r, bandwidth, device) -> Record:
    """The shape's cache write: kernel vs index_copy_, limit = its K/V bytes read and written
    once at the copy bandwidth."""
    Hkv = args.kv_heads or args.heads
    nbytes = 2 * 2 * batch * new * Hkv * args.head_dim * getattr(torch, args.dtype).itemsize
    limit = nbytes / bandwidth
    kernel, baseline = r["cache_write_s"], r["index_copy_s"]
    print(
        f"{name:>12} cache write {kernel * 1e6:.1f} us, index_copy_ {baseline * 1e6:.1f} us, "
        f"limit {limit * 1e6:.1f} us",
        flush=True,
    )
    return layer_record(
        args,
        f"cache_write_layer_{name}",
        kernel,
        batch,
        context,
        device,
        baseline=("index_copy_ into the cache as [slots, 2, Hkv, D]", baseline),
        floor=limit,
        scenario=SCENARIO,
        notes=(
            f"the {batch * new} new tokens' K and V ({Hkv} KV heads x {args.head_dim}, "
            f"{args.dtype}) into their slots of the paged cache, as `Attention` writes them "
            f"before a prefill's attention: energon.parallel.cache_write (Triton) vs "
            f"index_copy_ (the path before it); equal caches checked; median CUDA-event time "
            f"of {args.repeat} single calls, L2 flushed; limit = {nbytes / 1e6:.1f} MB read "
            f"and written / {bandwidth / 1e9:.0f} GB/s"
        ),
    )


def main(args: argparse.Namespace) -> int:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        print("no CUDA: timing on CPU (set TRITON_INTERPRET=1 to run the kernel; a smoke run)")
    dtype = getattr(torch, args.dtype)
    shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
    configs = [tuple(int(p) for p in c.split(":")) for c in args.configs.split(",") if c]
    cuda = device.type == "cuda"
    bandwidth = copy_bandwidth(device, (args.copy_mib if cuda else 16) << 20)
    rate = matmul_rate(device, dtype if cuda else torch.float32, args.matmul_size if cuda else 256)
    print(
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, matmul {rate / 1e12:.0f} TFLOP/s", flush=True
    )
    timer = Timer(device, args.warmup, args.repeat)
    Hkv = args.kv_heads or args.heads
    layout = (
        f"{args.heads} heads, {Hkv} KV heads, head_dim {args.head_dim}, block {args.block_size}"
    )
    print(
        f"\n{'shape':>12} {'kernel us':>10} {'grid us':>10} {'ratio':>6} {'flash us':>9} "
        f"{'limit us':>9} {'of_limit':>8}  configs"
    )
    records = []
    for shape in shapes:
        batch, new, context = shape
        r = measure(args, timer, shape, device, dtype, configs)
        flops, nbytes = work(batch, new, context, args.heads, Hkv, args.head_dim, dtype.itemsize)
        limit = max(flops / rate, nbytes / bandwidth)
        name = f"{batch}x{new}@{context}"
        flash = r.get("flash_contiguous_s")
        cfg = ", ".join(f"{n} {t * 1e6:.1f}" for n, t in r["configs"].items())
        print(
            f"{name:>12} {r['kernel_s'] * 1e6:>10.1f} {r['grid_s'] * 1e6:>10.1f} "
            f"{r['grid_s'] / r['kernel_s']:>6.2f} "
            f"{flash * 1e6 if flash else float('nan'):>9.1f} {limit * 1e6:>9.1f} "
            f"{limit / r['kernel_s']:>8.3f}  {cfg}",
            flush=True,
        )
        notes = (
            f"{batch} sequences of {new} new tokens after {context - new} cached keys, {layout}, "
            f"{args.dtype}{', ALiBi' if args.alibi else ''}; Triton prefill kernel (default "
            f"tiles) vs Attention._varlen grid path, both reading a cache that holds the new "
            f"K/V; median CUDA-event time of {args.repeat} single calls, L2 flushed; limit = "
            f"max({flops / 1e9:.2f} GFLOP / {rate / 1e12:.0f} TFLOP/s, {nbytes / 1e6:.1f} MB / "
            f"{bandwidth / 1e9:.0f} GB/s); max |kernel - grid| {r['max_abs_diff']:.2e}"
        )
        if flash:
            notes += (
                f"; torch flash varlen on the same keys laid out contiguously {flash * 1e6:.1f} us"
            )
        if cfg:
            notes += f"; kernel configs block_m:block_n:warps:stages us: {cfg}"
        records.append(
            layer_record(
                args,
                f"prefill_attention_layer_{name}",
                r["kernel_s"],
                batch,
                context,
                device,
                baseline=("grid path (dense KV gather + SDPA)", r["grid_s"]),
                floor=limit,
                scenario=SCENARIO,
                notes=notes,
            )
        )
        records.append(cache_write_record(args, name, batch, new, context, r, bandwidth, device))
    records.append(copy_bandwidth_record(SCENARIO, bandwidth, int(cuda)))
    records.append(
        Record(
            scenario=SCENARIO,
            metric="matmul_rate",
            unit="TFLOP/s",
            value=rate / 1e12,
            dtype=args.dtype if cuda else "float32",
            n_gpus=int(cuda),
            notes=f"[{args.matmul_size}]^2 torch.mm, measured in the same run",
        )
    )
    path = write_results(SCENARIO, records, args.out)
    print(f"\nwrote {path}")
    return 0
