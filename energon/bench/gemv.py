"""`energon bench gemv`: the linear layers of a decode step, Triton GEMV against cuBLAS.

Each shape is a weight matrix of opt-13b or llama-2-13b as one tp rank holds it (column-parallel
layers split N, row-parallel ones split K), multiplied by a few rows of x with its bias (and
ReLU for opt's fc1) the way the model calls it. Energon: `energon.kernels.gemv_kernels.gemv`
(what `energon.kernels.gemv.linear` runs for up to 16 rows). Baseline: cuBLAS through
`F.linear` / `torch._addmm_activation` (what ran before). Both are replayed from one CUDA graph
over rotating copies of the weight (600 MB and more, past L2), per call = graph time / calls,
best of 3 replays. Floor = weight bytes / copy bandwidth (a device-to-device copy measured in the
same run, bytes read + written; a pure read stream can run a few percent above it).

On sm_90+ each shape also runs as the Engine launches it there, a programmatic dependent launch,
once per `--pdl-prefetch` value (weight tiles a program fetches into L2 before it waits for the
kernel before it): records `{layer}_pdl{tiles}_us` against the plain Triton launches of the same
graph. Each call in the graph waits for the one before, as in a decode step's chain.

With `--tma` (sm_90+, at most `TMA_ROWS` rows) the Gluon kernel the Engine runs there
(`energon.kernels.gemv_tma`, weights copied by TMA before the wait) is timed the same way,
records `{layer}_tma_us` against the Triton GEMV's dependent launches. A GEMV in a decode step
follows a latency-bound kernel (an all-reduce + norm, an attention) that leaves HBM idle; with
`--behind-us`, every call in the graph follows a one-program kernel that spins that long (a
dependent launch itself, releasing the GEMV right after its wait): records
`{layer}_behind{us}_tma_us` and `_behind{us}_us`, the time a pair takes less the spin's own.
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

from energon.bench.limits import copy_bandwidth
from energon.bench.record import Record, copy_bandwidth_record, write_results
from energon.kernels.gemv import TMA_ROWS

SCENARIO = "gemv"
# (model, layer, N, K, bias, relu) at tp=1; `split` says which side tp divides
LAYERS = [
    ("opt-13b", "qkv", 15360, 5120, True, False, "N"),
    ("opt-13b", "out_proj", 5120, 5120, True, False, "K"),
    ("opt-13b", "fc1+relu", 20480, 5120, True, True, "N"),
    ("opt-13b", "fc2", 5120, 20480, True, False, "K"),
    ("llama-2-13b", "gate_up", 27648, 5120, False, False, "N"),
    ("llama-2-13b", "down", 5120, 13824, False, False, "K"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", default="1,8", help="comma-separated rows of x (<= 16)")
    parser.add_argument("--tp", default="1,2,4", help="comma-separated tp sizes (shard shapes)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument(
        "--bytes-per-graph", type=int, default=600, help="MB of weights a graph reads"
    )
    parser.add_argument("--copy-mib", type=int, default=1024, help="copy bandwidth buffer")
    parser.add_argument(
        "--pdl-prefetch",
        default="0,4,16",
        help="comma-separated weight tiles prefetched per program by the dependent launches "
        "(sm_90+; '' for none)",
    )
    parser.add_argument(
        "--tma", choices=["on", "off"], default="on", help="time the Gluon TMA GEMV (sm_90+)"
    )
    parser.add_argument(
        "--behind-us",
        default="6",
        help="comma-separated spins (us) put before each call for the TMA comparison ('' none)",
    )
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")


def graph_seconds(fn, weights, reps: int = 3) -> float:
    """Seconds per call of fn(w) over `weights`, replayed from one CUDA graph (best of reps)."""
    for w in weights[:2]:
        fn(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / len(weights))
    return best


@functools.cache
def _spin_kernel():
    import triton
    import triton.language as tl

    from energon.kernels.chain import wait_then_release

    @triton.jit
    def spin(ns, PDL: tl.constexpr):
        wait_then_release(PDL)
        start = tl.extra.cuda.globaltimer()
        while tl.extra.cuda.globaltimer() - start < ns:
            pass

    return spin


def spin(microseconds: float) -> None:
    """One program that waits for the kernel before, lets the next one start and spins."""
    from energon.kernels.chain import launch_options

    _spin_kernel()[(1,)](int(microseconds * 1000), **launch_options(True))


def shape_record(
    args, model, metric, tp, rows, floor, seconds, baseline, baseline_seconds, notes
) -> Record:
    """One shape's point: `seconds` a call against `baseline_seconds`, `floor` the weights'
    read time at copy bandwidth."""
    return Record(
        scenario=SCENARIO,
        metric=metric,
        unit="us",
        value=seconds * 1e6,
        model=model,
        dtype=args.dtype,
        tp=tp,
        batch=rows,
        baseline_name=baseline,
        baseline_value=baseline_seconds * 1e6,
        ratio=baseline_seconds / seconds,
        limit_value=floor * 1e6,
        of_limit=floor / seconds,
        n_gpus=1,
        notes=notes,
    )


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("energon bench gemv needs CUDA (CUDA graphs of Triton and cuBLAS kernels)")
        return 1
    from energon.kernels import gemv_kernels

    device, dtype = torch.device("cuda", 0), getattr(torch, args.dtype)
    prefetches = [int(t) for t in args.pdl_prefetch.split(",") if t.strip()]
    if torch.cuda.get_device_capability(device)[0] < 9:
        prefetches = []  # dependent launches need sm_90
    bandwidth = copy_bandwidth(device, args.copy_mib << 20)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + written)", flush=True)
    print(f"\n{'layer':>22} {'tp':>2} {'rows':>4} {'triton us':>10} {'cublas us':>10} "
          f"{'ratio':>6} {'floor us':>9} {'of_floor':>8} {'max diff':>9}")  # fmt: skip
    records = []
    torch.manual_seed(0)
    for model, layer, n, k, has_bias, relu, split in LAYERS:
        for tp in (int(t) for t in args.tp.split(",")):
            N, K = (n // tp, k) if split == "N" else (n, k // tp)
            copies = max(4, -(-args.bytes_per_graph * 10**6 // (N * K * 2)))
            weights = [
                torch.randn(N, K, device=device, dtype=dtype) * K**-0.5 for _ in range(copies)
            ]
            bias = torch.randn(N, device=device, dtype=dtype) if has_bias else None
            if split == "K" and tp > 1:
                bias = None  # a row-parallel shard's bias is added after the all-reduce
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, K, device=device, dtype=dtype)

                def cublas(w, x=x, bias=bias, relu=relu):
                    if relu:
                        return torch._addmm_activation(bias, x, w.t())
                    return F.linear(x, w, bias)

                def triton(w, x=x, bias=bias, relu=relu, pdl=False, tiles=0):
                    return gemv_kernels.gemv(x, w, bias, relu, pdl=pdl, prefetch_tiles=tiles)

                diff = (triton(weights[0]).float() - cublas(weights[0]).float()).abs().max().item()
                t_triton = graph_seconds(triton, weights)
                t_cublas = graph_seconds(cublas, weights)
                floor = N * K * 2 / bandwidth
                name = f"{model} {layer}"
                print(f"{name:>22} {tp:>2} {rows:>4} {t_triton * 1e6:>10.2f} {t_cublas * 1e6:>10.2f} "
                      f"{t_cublas / t_triton:>6.3f} {floor * 1e6:>9.2f} {floor / t_triton:>8.3f} "
                      f"{diff:>9.2e}", flush=True)  # fmt: skip
                records.append(
                    shape_record(
                        args,
                        model,
                        f"{layer}_us",
                        tp,
                        rows,
                        floor,
                        t_triton,
                        "cuBLAS (F.linear / torch._addmm_activation)",
                        t_cublas,
                        f"x [{rows}, {K}] @ W[{N}, {K}].T{' + bias' if bias is not None else ''}"
                        f"{' then ReLU' if relu else ''}, {args.dtype}; the shard of one tp={tp} "
                        f"rank; CUDA graph of {copies} calls on rotating weight copies, best of "
                        f"3 replays; floor = {N * K * 2 / 1e6:.1f} MB / "
                        f"{bandwidth / 1e9:.0f} GB/s copy bandwidth; max |triton - cublas| "
                        f"{diff:.2e}",
                    )
                )
                for tiles in prefetches:
                    dependent = functools.partial(triton, pdl=True, tiles=tiles)
                    t_pdl = graph_seconds(dependent, weights)
                    print(f"{name:>22} {tp:>2} {rows:>4} dependent launches, {tiles} tiles "
                          f"prefetched: {t_pdl * 1e6:.2f} us ({t_triton / t_pdl:.3f}x plain, "
                          f"{floor / t_pdl:.3f} of floor)", flush=True)  # fmt: skip
                    records.append(
                        shape_record(
                            args,
                            model,
                            f"{layer}_pdl{tiles}_us",
                            tp,
                            rows,
                            floor,
                            t_pdl,
                            "the Triton GEMV, plain launches (same graph)",
                            t_triton,
                            f"as {layer}_us, each call a programmatic dependent launch that "
                            f"fetches {tiles} weight tiles per program into L2 before waiting for "
                            "the call before",
                        )
                    )
                if args.tma == "on" and prefetches and rows <= TMA_ROWS:
                    records += tma_records(args, model, layer, tp, rows, floor, x, bias, relu,
                                           weights, triton, copies)  # fmt: skip
            del weights
    records.append(copy_bandwidth_record(SCENARIO, bandwidth, n_gpus=1))
    path = write_results(SCENARIO, records, args.out)
    print(f"\nwrote {path}")
    return 0


def tma_records(args, model, layer, tp, rows, floor, x, bias, relu, weights, triton, copies):
    """The Gluon TMA GEMV against the Triton GEMV's dependent launches (no L2 prefetch), alone
    in a chain and behind each `--behind-us` spin."""
    from energon.kernels import gemv_tma

    def tma(w):
        return gemv_tma.gemv(x, w, bias, relu, pdl=True)

    dependent = functools.partial(triton, pdl=True, tiles=0)
    diff = (tma(weights[0]).float() - dependent(weights[0]).float()).abs().max().item()
    name, records = f"{model} {layer}", []
    pairs = [(0.0, f"{layer}_tma_us", tma, dependent)]
    for us in (float(u) for u in args.behind_us.split(",") if u.strip()):
        spun = [(lambda w, f=f, us=us: (spin(us), f(w))[1]) for f in (tma, dependent)]
        pairs.append((us, f"{layer}_behind{us:g}_tma_us", *spun))
    alone = None  # the Triton GEMV's time alone in the chain (the first pair)
    for us, metric, ours, theirs in pairs:
        less = graph_seconds(lambda w, us=us: spin(us), weights) if us else 0.0  # spin's own
        t_ours = graph_seconds(ours, weights) - less
        t_theirs = graph_seconds(theirs, weights) - less
        alone = t_theirs if alone is None else alone
        print(f"{name:>22} {tp:>2} {rows:>4} TMA{f' behind {us:g} us' if us else ''}: "
              f"{t_ours * 1e6:.2f} us against {t_theirs * 1e6:.2f} ({t_theirs / t_ours:.3f}x, "
              f"{floor / t_ours:.3f} of floor; spin {less * 1e6:.2f} us)", flush=True)  # fmt: skip
        where = (
            f"each after a {us:g} us spin (a pair's time less the spin's own, {less * 1e6:.2f} us)"
        )
        records.append(
            shape_record(
                args,
                model,
                metric,
                tp,
                rows,
                floor,
                t_ours,
                "the Triton GEMV, dependent launches, no L2 prefetch (same graph)",
                t_theirs,
                f"as {layer}_us, the Gluon TMA kernel (energon/kernels/gemv_tma.py), "
                f"{'alone in the chain' if not us else where}; {copies} calls a graph; "
                f"max |tma - triton| {diff:.2e}",
            )  # fmt: skip
        )
        if us:
            records.append(
                shape_record(
                    args,
                    model,
                    f"{layer}_behind{us:g}_us",
                    tp,
                    rows,
                    floor,
                    t_theirs,
                    "the Triton GEMV alone in the chain (dependent launches, same graph)",
                    alone,
                    f"as {layer}_pdl0_us, {where}",
                )  # fmt: skip
            )
    return records
