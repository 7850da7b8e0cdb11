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
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

from energon.bench.limits import copy_bandwidth
from energon.bench.record import Record, copy_bandwidth_record, write_results

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
            del weights
    records.append(copy_bandwidth_record(SCENARIO, bandwidth, n_gpus=1))
    path = write_results(SCENARIO, records, args.out)
    print(f"\nwrote {path}")
    return 0
