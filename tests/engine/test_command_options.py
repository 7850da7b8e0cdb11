"""The engine options every command shares (energon run, energon serve) reach the Engine."""

from __future__ import annotations

import argparse

import pytest

from energon import Engine
from energon.commands.options import add_engine_arguments, engine_kwargs


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
