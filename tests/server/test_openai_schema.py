"""OpenAI request parsing and chat rendering, without a server."""

from __future__ import annotations

import pytest

from energon import InvalidRequest
from energon.server.chat import parse_messages, render_chat
from energon.server.frontend import Limits
from energon.server.messages import NotFound
from energon.server.openai_schema import chunk, parse_chat, parse_completion

LIMITS = Limits()


class TemplatedTokenizer:
    chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )


class PlainTokenizer:
    chat_template = None


def test_completion_fields_map_to_sampling_params():
    req = parse_completion(
        {"prompt": "x", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": "\n", "seed": 3},
        LIMITS,
        "tiny",
    )
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed) == (7, 0.5, 0.9, ("\n",), 3)
    assert req.prompts == ["x"] and not req.stream and not req.chat


def test_completion_defaults_to_16_tokens_and_accepts_token_ids():
    req = parse_completion({"prompt": [1, 2, 3]}, LIMITS, "tiny")
    assert req.prompts == [[1, 2, 3]] and req.params.max_tokens == 16


def test_a_model_other_than_the_served_one_is_not_found():
    with pytest.raises(NotFound, match="'tiny'"):
        parse_completion({"prompt": "x", "model": "gpt-4"}, LIMITS, "tiny")


def test_too_many_prompts_are_refused():
    with pytest.raises(InvalidRequest, match="limit is 64"):
        parse_completion({"prompt": ["a"] * 65}, LIMITS, "tiny")


def test_several_prompts_may_stream():
    req = parse_completion({"prompt": ["a", "b"], "stream": True}, LIMITS, "tiny")
    assert req.stream and req.prompts == ["a", "b"]


def test_max_completion_tokens_wins_and_is_named_in_errors():
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}
    with pytest.raises(InvalidRequest) as info:
        parse_chat(body, LIMITS, "tiny", PlainTokenizer())
    assert info.value.field == "max_completion_tokens"


def test_chat_template_renders_with_the_generation_prompt():
    tok = TemplatedTokenizer()
    messages = parse_messages(
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "text", "text": "U"}]},
        ]
    )
    assert render_chat(tok, messages) == "<|system|>S<|user|>U<|assistant|>"


def test_chat_without_template_uses_role_lines():
    messages = [{"role": "user", "content": "Hi"}]
    assert render_chat(PlainTokenizer(), messages) == "user: Hi\nassistant:"


def test_a_template_that_raises_is_a_400_on_messages():
    tok = TemplatedTokenizer()
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(InvalidRequest, match="roles must alternate") as info:
        render_chat(tok, [{"role": "user", "content": "x"}])
    assert info.value.field == "messages"


def test_chat_stream_chunks_carry_role_first_then_content():
    first = chunk("id", "tiny", True, "", first=True)
    later = chunk("id", "tiny", True, "ab", "length")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert later["choices"][0]["delta"] == {"content": "ab"}
    assert later["choices"][0]["finish_reason"] == "length"


def test_logprobs_ask_the_engine_for_at_least_the_chosen_tokens():
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (parse_completion({"prompt": "x", "logprobs": 3}, LIMITS, "tiny"), 3, 3),
        (parse_completion({"prompt": "x", "logprobs": 0}, LIMITS, "tiny"), 0, 1),
        (parse_completion({"prompt": "x"}, LIMITS, "tiny"), None, 0),
        (parse_chat({**chat, "logprobs": True}, LIMITS, "tiny", PlainTokenizer()), 0, 1),
        (
            parse_chat(
                {**chat, "logprobs": True, "top_logprobs": 5}, LIMITS, "tiny", PlainTokenizer()
            ),
            5,
            5,
        ),
        (parse_chat({**chat, "logprobs": False}, LIMITS, "tiny", PlainTokenizer()), None, 0),
    ]
    for req, shown, asked in cases:
        assert (req.top_logprobs, req.params.logprobs) == (shown, asked)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "logprobs": "2"}, "logprobs"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "x", "frequency_penalty": "1"}, "frequency_penalty"),
        ({"prompt": "x", "logit_bias": {"a7": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"-7": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"7": 101}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": [[7, 1]]}, "logit_bias"),
        ({"prompt": "x", "min_tokens": 17}, "min_tokens"),  # > max_tokens (16)
        ({"prompt": "x", "min_tokens": False}, "min_tokens"),
        ({"prompt": "x", "min_p": 1.1}, "min_p"),
        ({"prompt": "x", "use_beam_search": True}, "use_beam_search"),
        ({"prompt": "x", "prompt_logprobs": 1}, "prompt_logprobs"),
        ({"prompt": "x", "include_stop_str_in_output": 1}, "include_stop_str_in_output"),
        ({"prompt": "x", "stop_token_ids": "7"}, "stop_token_ids"),
        ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_unsupported_or_malformed_sampling_fields_are_refused_by_name(body, field):
    with pytest.raises(InvalidRequest) as info:
        if "messages" in body:
            parse_chat(body, LIMITS, "tiny", PlainTokenizer())
        else:
            parse_completion(body, LIMITS, "tiny")
    assert info.value.field == field


def test_vllm_fields_at_their_neutral_values_and_stop_token_ids_are_served():
    body = {"prompt": "x", "repetition_penalty": 1.0, "min_tokens": 0, "min_p": 0.0}
    req = parse_completion({**body, "stop_token_ids": [7, 9], "ignore_eos": True}, LIMITS, "tiny")
    assert req.params.stop_token_ids == (7, 9) and req.params.ignore_eos
    assert parse_completion({"prompt": "x", "min_tokens": 5}, LIMITS, "tiny").params.min_tokens == 5
    kept = parse_completion({"prompt": "x", "include_stop_str_in_output": True}, LIMITS, "tiny")
    assert kept.params.include_stop_str_in_output


def test_penalties_and_logit_bias_are_served():
    body = {"prompt": "x", "presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {}}
    params = parse_completion({**body, "repetition_penalty": 1.2}, LIMITS, "tiny").params
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert params.repetition_penalty == 1.2 and params.logit_bias == ()
    assert parse_completion({"prompt": "x", "min_p": 0.1}, LIMITS, "tiny").params.min_p == 0.1
    chat = {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"50": -100, "7": 2}}
    parsed = parse_chat(chat, LIMITS, "tiny", PlainTokenizer())
    assert parsed.params.logit_bias == ((7, 2.0), (50, -100.0))


def test_chat_without_max_tokens_fills_the_context_up_to_the_servers_limit():
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    open_ended = parse_chat(chat, LIMITS, "tiny", PlainTokenizer())
    assert open_ended.fill_context and open_ended.params.max_tokens == LIMITS.max_tokens
    for field in ("max_tokens", "max_completion_tokens"):
        bounded = parse_chat({**chat, field: 9}, LIMITS, "tiny", PlainTokenizer())
        assert not bounded.fill_context and bounded.params.max_tokens == 9
    assert not parse_completion({"prompt": "x"}, LIMITS, "tiny").fill_context  # OpenAI's 16


def test_n_gives_each_prompt_n_choices_seeded_apart():
    req = parse_completion({"prompt": ["a", "b"], "n": 3, "seed": 5}, LIMITS, "tiny")
    assert req.n == 3 and [p.seed for p in req.choice_params()] == [5, 6, 7, 5, 6, 7]
    unseeded = parse_completion({"prompt": "a", "n": 2}, LIMITS, "tiny").choice_params()
    assert [p.seed for p in unseeded] == [None, None]
    chat = {"messages": [{"role": "user", "content": "hi"}], "n": 4}
    assert parse_chat(chat, LIMITS, "tiny", PlainTokenizer()).n == 4
    wrapped = parse_completion({"prompt": "a", "n": 2, "seed": 2**63 - 1}, LIMITS, "tiny")
    assert [p.seed for p in wrapped.choice_params()] == [2**63 - 1, 0]


@pytest.mark.parametrize("n", [0, "2", True, 1.0, 33])
def test_n_out_of_range_names_the_field(n):
    with pytest.raises(InvalidRequest) as info:
        parse_completion({"prompt": ["a", "b"], "n": n}, LIMITS, "tiny")  # 64 // 2 = 32 at most
    assert info.value.field == "n"
