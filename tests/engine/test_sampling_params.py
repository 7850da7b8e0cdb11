"""SamplingParams: the defaults of DESIGN.md §3, every bad value refused naming its field."""

import dataclasses
import math

import msgpack
import pytest

from energon.errors import InvalidRequest
from energon.sampling import Completion, SamplingParams, TokenLogprob, Usage

INVALID = [
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", "5"),
    ("max_tokens", True),
    ("max_tokens", 5.0),
    ("max_tokens", None),
    ("temperature", -0.1),
    ("temperature", math.inf),
    ("temperature", math.nan),
    ("temperature", "1"),
    ("temperature", True),
    ("top_k", -1),
    ("top_k", 2.0),
    ("top_k", False),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.5),
    ("top_p", math.nan),
    ("top_p", "0.9"),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", 1.0),
    ("seed", True),
    ("seed", "42"),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", ["ok", 3]),
    ("stop", 3),
    ("stop", b"\n"),
    ("stop", ["s"] * 17),
    ("stop_token_ids", [1, -2]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", 5),
    ("stop_token_ids", "12"),
    ("ignore_eos", 1),
    ("ignore_eos", "yes"),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 1.0),
    ("logprobs", True),
    ("min_tokens", -1),
    ("min_tokens", 17),  # > max_tokens (16)
    ("min_tokens", 2.0),
    ("presence_penalty", 2.5),
    ("presence_penalty", "1"),
    ("frequency_penalty", -2.01),
    ("frequency_penalty", math.nan),
    ("frequency_penalty", True),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("logit_bias", {5: 100.5}),
    ("logit_bias", {5: math.nan}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"5": 1.0}),  # the HTTP door turns JSON's string keys into ints
    ("logit_bias", {5: "1"}),
    ("logit_bias", [(5, 1.0), (5, 2.0)]),
    ("logit_bias", [(5, 1.0, 2.0)]),
    ("logit_bias", "5:1"),
    ("logit_bias", {i: 1.0 for i in range(1025)}),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("min_p", math.nan),
    ("min_p", "0.1"),
]


@pytest.mark.parametrize(("field", "value"), INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_raises_invalid_request_naming_the_field(field, value):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field} must be")
    assert "(got " in str(info.value)


def test_defaults_match_the_public_contract():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed) == (16, 1.0, 0, 1.0, None)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs) == ((), (), False, 0)
    assert not p.greedy


def test_boundary_values_are_accepted():
    p = SamplingParams(
        max_tokens=1, temperature=0, top_k=0, top_p=1, seed=2**63 - 1, logprobs=20, stop=["x"] * 16
    )
    assert p.greedy and p.temperature == 0.0 and isinstance(p.temperature, float)


def test_stop_string_and_lists_are_normalised_to_tuples():
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)


def test_params_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().max_tokens = 0


def test_validate_refuses_max_tokens_above_the_cap():
    p = SamplingParams(max_tokens=100)
    assert p.validate(max_tokens_cap=100) is p
    with pytest.raises(InvalidRequest) as info:
        p.validate(max_tokens_cap=99)
    assert info.value.field == "max_tokens" and "<= 99" in str(info.value)


def test_validate_refuses_stop_token_ids_outside_the_vocabulary():
    p = SamplingParams(stop_token_ids=[7, 260])
    with pytest.raises(InvalidRequest) as info:
        p.validate(vocab_size=260)
    assert info.value.field == "stop_token_ids" and "260" in str(info.value)


def test_to_wire_is_msgpack_round_trippable_with_the_sampler_fields():
    p = SamplingParams(temperature=0.5, top_k=40, top_p=0.9, seed=2**63 - 1, logprobs=3)
    wire = msgpack.unpackb(msgpack.packb(p.to_wire()))
    assert wire == {"temperature": 0.5, "top_k": 40, "top_p": 0.9, "seed": 2**63 - 1, "logprobs": 3}


def test_penalties_and_bias_reach_the_wire_only_when_set():
    assert not SamplingParams(repetition_penalty=1, presence_penalty=0).penalised
    p = SamplingParams(frequency_penalty=-2, logit_bias={9: -100, 2: 0.5})
    assert p.penalised and p.logit_bias == ((2, 0.5), (9, -100.0))
    assert SamplingParams(frequency_penalty=-2.0, logit_bias=[(9, -100), (2, 0.5)]) == p
    wire = msgpack.unpackb(msgpack.packb(p.to_wire()))
    assert wire["bias_ids"] == [2, 9] and wire["bias_values"] == [0.5, -100.0]
    assert (wire["frequency_penalty"], wire["presence_penalty"]) == (-2.0, 0.0)
    assert "bias_ids" not in SamplingParams(repetition_penalty=1.1).to_wire()
    assert "min_p" not in p.to_wire() and SamplingParams(min_p=0.1).to_wire()["min_p"] == 0.1


def test_validate_refuses_logit_bias_outside_the_vocabulary():
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(logit_bias={259: 1, 260: 1}).validate(vocab_size=260)
    assert info.value.field == "logit_bias" and "260" in str(info.value)


def test_usage_total_is_the_sum():
    assert Usage(prompt_tokens=7, completion_tokens=5).total_tokens == 12


def test_token_logprob_from_sampler_row():
    row = {"token_id": 4, "logprob": -0.5, "top_ids": [4, 9], "top_logprobs": [-0.5, -1.25]}
    assert TokenLogprob.from_wire(row) == TokenLogprob(4, -0.5, [(4, -0.5), (9, -1.25)])


def test_completion_defaults_logprobs_and_timings_to_none():
    done = Completion("hi", [104, 105], "length", Usage(1, 2))
    assert done.logprobs is None and done.timings is None
