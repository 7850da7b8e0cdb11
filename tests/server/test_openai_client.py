"""The openai Python package as a real client of the HTTP door."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture
async def oai(server):
    client = openai.AsyncOpenAI(base_url=server.http + "/v1", api_key="unused", max_retries=0)
    yield client
    await client.close()


async def test_completions_create(oai):
    done = await oai.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.prompt_tokens == 5 and 0 < done.usage.completion_tokens <= 8
    streamed = await oai.completions.create(
        model="tiny", prompt="Hello", max_tokens=8, temperature=0, stream=True
    )
    text = "".join([c.choices[0].text async for c in streamed])
    assert text == done.choices[0].text


async def test_chat_completions_create_and_stream(oai):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    done = await oai.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0
    )
    assert done.choices[0].message.role == "assistant"
    stream = await oai.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens


async def test_models_list(oai):
    assert [m.id async for m in oai.models.list()] == ["tiny"]


async def test_errors_raise_the_openai_exceptions(oai):
    with pytest.raises(openai.BadRequestError) as info:
        await oai.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert "max_tokens" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        await oai.completions.create(model="nope", prompt="x", max_tokens=2)


async def test_logprobs_parse_into_the_packages_types(oai):
    done = await oai.completions.create(
        model="tiny", prompt="Hello", max_tokens=4, temperature=0, logprobs=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0 and all(v <= 0 for v in lp.token_logprobs)
    chat = await oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == c.logprob for c in content)


async def test_penalties_logit_bias_and_echo_through_the_package(oai):
    base = dict(model="tiny", max_tokens=6, temperature=0)
    biased = await oai.chat.completions.create(
        messages=[{"role": "user", "content": "Hi"}], logit_bias={str(ord("k")): 100}, **base
    )
    assert biased.choices[0].message.content == "k" * 6
    plain = await oai.completions.create(prompt="Hello", **base)
    penalised = await oai.completions.create(
        prompt="Hello", frequency_penalty=2.0, presence_penalty=1.0, **base
    )
    assert penalised.choices[0].finish_reason in ("length", "stop")
    echoed = await oai.completions.create(prompt="Hello", echo=True, logprobs=1, **base)
    choice = echoed.choices[0]
    assert choice.text == "Hello" + plain.choices[0].text
    assert (
        choice.logprobs.token_logprobs[0] is None
        and len(choice.logprobs.tokens) == 5 + echoed.usage.completion_tokens
    )
    with pytest.raises(openai.BadRequestError) as info:
        await oai.completions.create(prompt="x", presence_penalty=3, **base)
    assert "presence_penalty" in str(info.value)
