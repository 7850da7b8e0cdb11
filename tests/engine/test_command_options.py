"""The engine options every command shares (energon run, energon serve) reach the Engine."""

from __future__ import annotations

import argparse

import pytest

from energon import Engine, InvalidRequest
from energon.commands.options import (
    add_engine_arguments,
    add_sampling_arguments,
    engine_kwargs,
    sampling_params,
)


def parse(argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return parser.parse_args(argv.split())


def test_launcher_and_address_reach_the_engine():
    args = parse("--model tiny --tp 2 --pp 2 --launcher external --address tcp://127.0.0.1:29555")
    kwargs = engine_kwargs(args)
    assert kwargs["launcher"] == "external" and kwargs["address"] == "tcp://127.0.0.1:29555"
    engine = Engine(args.model, **kwargs)  # validated at construction, nothing started
    assert (engine.launcher, engine.address, engine.tp, engine.pp) == (
        "external",
        "tcp://127.0.0.1:29555",
        2,
        2,
    )


def test_the_default_is_local_workers_and_an_unknown_launcher_is_refused(capsys):
    kwargs = engine_kwargs(parse(""))
    assert kwargs["launcher"] == "local" and kwargs["address"] is None
    assert kwargs["decode_graphs"] == "auto"
    assert engine_kwargs(parse("--decode-graphs off"))["decode_graphs"] == "off"
    assert kwargs["max_restarts"] == 3 and kwargs["retry_on_failure"] is False
    chosen = engine_kwargs(parse("--max-restarts 0 --retry-on-failure"))
    assert chosen["max_restarts"] == 0 and chosen["retry_on_failure"] is True
    engine = Engine("tiny", **chosen)
    assert engine.recovery.max_restarts == 0 and engine.recovery.retry_on_failure
    with pytest.raises(SystemExit):
        parse("--launcher slurm")
    assert "invalid choice: 'slurm'" in capsys.readouterr().err


def test_kv_reserve_reaches_the_engine_and_defaults_to_zero():
    assert engine_kwargs(parse(""))["kv_reserve"] == 0.0
    kwargs = engine_kwargs(parse("--kv-reserve 0.5"))
    assert kwargs["kv_reserve"] == 0.5 and Engine("tiny", **kwargs).kv_reserve == 0.5


def test_the_scheduler_cache_and_pool_options_reach_the_engine():
    args = parse(
        "--pp 2 --stage-splits 1,1 --max-num-seqs 8 --max-waiting 9 --max-batch-tokens 512 "
        "--max-model-len 128 --block-size 8 --max-steps-in-flight 3 --pool host "
        "--gpu-memory-budget 1GiB"
    )
    engine = Engine(args.model, **engine_kwargs(args))
    got = (
        engine.stage_splits,
        engine.max_num_seqs,
        engine.max_waiting,
        engine.max_batch_tokens,
        engine.max_model_len,
        engine.block_size,
        engine.max_steps_in_flight,
        engine.pool_mode,
        engine.gpu_memory_budget,
    )
    assert got == ([1, 1], 8, 9, 512, 128, 8, 3, "host", 2**30)
    defaults = Engine("tiny", **engine_kwargs(parse("--pp 2")))
    assert (defaults.max_batch_tokens, defaults.max_steps_in_flight) == (4096, 2)
    assert defaults.stage_splits is None and defaults.pool_mode is None


def test_bad_option_values_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        parse("--stage-splits 1,x")
    assert "--stage-splits: must be comma-separated ints" in capsys.readouterr().err
    with pytest.raises(InvalidRequest) as info:
        Engine("tiny", **engine_kwargs(parse("--pp 2 --stage-splits 1,1,1")))
    assert info.value.field == "stage_splits"


def test_sampling_options_include_stop_token_ids_and_ignore_eos():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, max_tokens=5)
    params = sampling_params(parser.parse_args("--stop-token-id 7 --stop-token-id 9 --ignore-eos".split()))  # fmt: skip
    assert (params.max_tokens, params.stop_token_ids, params.ignore_eos) == (5, (7, 9), True)
    plain = sampling_params(parser.parse_args([]))
    assert (plain.stop_token_ids, plain.ignore_eos) == ((), False)
    assert not plain.penalised and plain.logit_bias == ()


def test_sampling_options_include_penalties_and_logit_bias(capsys):
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, max_tokens=5)
    args = "--repetition-penalty 1.2 --frequency-penalty 0.5 --presence-penalty -1 "
    args += "--logit-bias 7=-100 --logit-bias 9=2.5 --min-p 0.05"
    params = sampling_params(parser.parse_args(args.split()))
    assert (params.repetition_penalty, params.frequency_penalty) == (1.2, 0.5)
    assert params.presence_penalty == -1.0 and params.logit_bias == ((7, -100.0), (9, 2.5))
    assert params.min_p == 0.05
    with pytest.raises(SystemExit):
        parser.parse_args(["--logit-bias", "7:1"])
    assert "--logit-bias: must be TOKEN_ID=BIAS" in capsys.readouterr().err
