"""Command-line options shared by the commands that start an Engine or send requests."""

from __future__ import annotations

import argparse


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The Engine's options (--model --tp --pp --device --dtype, the scheduler's bounds, the KV
    cache, the pool, the launcher, recovery), read back by `engine_kwargs`."""
    parser.add_argument(
        "--model", default="tiny", help="checkpoint folder or preset (default tiny)"
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"]
    )
    parser.add_argument(
        "--stage-splits",
        type=_layer_counts,
        default=None,
        metavar="N,N,...",
        help="layers per pipeline stage, e.g. 21,19 (default: even)",
    )
    parser.add_argument("--max-num-seqs", type=int, default=256, help="running sequences")
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=4096,
        help="queued requests before new ones are refused as overloaded",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="new tokens per step (default 8192, 4096 with pipeline stages)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output (default: the model's context window)",
    )
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    parser.add_argument(
        "--max-steps-in-flight",
        type=int,
        default=None,
        help="micro-batches in flight (default: one per pipeline stage)",
    )
    parser.add_argument("--kv-cache-memory", default=None, help="per worker, e.g. 1GiB")
    parser.add_argument(
        "--kv-reserve",
        type=float,
        default=0.0,
        help="share (0-1) of the KV blocks running requests would still take to reach "
        "max_tokens that is kept free when admitting more: 1 never preempts (default 0)",
    )
    parser.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="compute every prompt in full (default: a request starts from the KV blocks of "
        "its longest prefix of full blocks already computed)",
    )
    parser.add_argument(
        "--launcher",
        default="local",
        choices=["local", "external", "ray"],
        help="where the workers come from (docs/multinode.md)",
    )
    parser.add_argument(
        "--address", default=None, help="tcp://HOST:PORT the controller listens on (multi-host)"
    )
    parser.add_argument(
        "--pool",
        default=None,
        choices=["auto", "peer", "host"],
        help="borrow memory for weights that do not fit from peer GPUs or pinned host memory",
    )
    parser.add_argument(
        "--gpu-memory-budget", default=None, help="with --pool: weights kept per GPU, e.g. 20GiB"
    )
    parser.add_argument(
        "--decode-graphs",
        default="auto",
        choices=["auto", "off"],
        help="CUDA graphs of decode steps (auto: on cuda)",
    )
    parser.add_argument(
        "--no-lookahead",
        dest="lookahead",
        action="store_false",
        help="send a micro-batch's next decode step only once its last one is back (default: "
        "chain them; at pp > 1 the last stage hands its tokens to the first)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="worker-group restarts in a row after a worker dies (0: fail for good)",
    )
    parser.add_argument(
        "--retry-on-failure",
        action="store_true",
        help="run again (once) the requests a dead worker took before any output",
    )


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The Engine keyword arguments of `add_engine_arguments` (the model is positional)."""
    return dict(
        tp=args.tp,
        pp=args.pp,
        device=args.device,
        dtype=args.dtype,
        stage_splits=args.stage_splits,
        max_num_seqs=args.max_num_seqs,
        max_waiting=args.max_waiting,
        max_batch_tokens=args.max_batch_tokens,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        max_steps_in_flight=args.max_steps_in_flight,
        kv_cache_memory=args.kv_cache_memory,
        kv_reserve=args.kv_reserve,
        prefix_caching=args.prefix_caching,
        pool=args.pool,
        gpu_memory_budget=args.gpu_memory_budget,
        launcher=args.launcher,
        address=args.address,
        decode_graphs=args.decode_graphs,
        lookahead=args.lookahead,
        max_restarts=args.max_restarts,
        retry_on_failure=args.retry_on_failure,
    )


def _layer_counts(text: str) -> list[int]:
    """'21,19' -> [21, 19] (the Engine checks the values)."""
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated ints (got {text!r})") from None


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """--max-tokens --temperature (default greedy) --top-k --top-p --min-p --seed --stop
    --stop-token-id --ignore-eos --min-tokens --include-stop-str-in-output --repetition-penalty
    --frequency-penalty --presence-penalty --logit-bias."""
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument(
        "--stop-token-id",
        dest="stop_token_ids",
        type=int,
        action="append",
        default=[],
        help="a token id that ends the output (repeatable)",
    )
    parser.add_argument(
        "--ignore-eos", action="store_true", help="generate max-tokens even past end-of-sequence"
    )
    parser.add_argument(
        "--min-tokens", type=int, default=0, help="tokens generated before a stop may end it"
    )
    parser.add_argument(
        "--include-stop-str-in-output",
        action="store_true",
        help="keep the stop string that ended the output at its end",
    )
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]")
    parser.add_argument(
        "--logit-bias",
        type=_bias_entry,
        action="append",
        default=[],
        metavar="TOKEN_ID=BIAS",
        help="add BIAS (in [-100, 100]) to a token's logit (repeatable)",
    )


def _bias_entry(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        if sep:
            return int(token), float(bias)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"must be TOKEN_ID=BIAS, e.g. 50256=-100 (got {text!r})")


def sampling_params(args: argparse.Namespace):
    """SamplingParams from `add_sampling_arguments`; raises InvalidRequest naming the field."""
    from energon.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_ids),
        ignore_eos=args.ignore_eos,
        include_stop_str_in_output=args.include_stop_str_in_output,
        min_tokens=args.min_tokens,
        repetition_penalty=args.repetition_penalty,
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
        logit_bias=args.logit_bias,
    )
