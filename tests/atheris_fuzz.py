"""Coverage-guided fuzzing of Energon's decoders with atheris (libFuzzer), an opt-in companion
to the hypothesis fuzz tests (not run by pytest or CI).

    pip install atheris
    python tests/atheris_fuzz.py wire -max_total_time=60      # actors/protocol.decode
    python tests/atheris_fuzz.py zmq -max_total_time=60       # the ZeroMQ door's decode_request
    python tests/atheris_fuzz.py openai -max_total_time=60    # parse_completion / parse_chat

Each target feeds the fuzzer's bytes to one decoder and fails (a crash report and the input that
caused it, under ./crash-*) on any exception other than the one the decoder documents for bad
input. Arguments after the target go to libFuzzer (-runs=N, -max_total_time=S, a corpus dir).
"""

from __future__ import annotations

import sys

import atheris
import msgpack

with atheris.instrument_imports():
    from energon.actors import protocol
    from energon.errors import InvalidRequest, ProtocolError
    from energon.server import messages, openai_schema
    from energon.server.frontend import Limits
    from energon.tokenizer import ByteTokenizer

LIMITS = protocol.Limits(max_message_bytes=1 << 20)
DOOR_LIMITS = Limits()
TOKENIZER = ByteTokenizer()


def wire(data: bytes) -> None:
    """A multipart message: the first byte says how many frames, the rest is split among them."""
    fdp = atheris.FuzzedDataProvider(data)
    count = fdp.ConsumeIntInRange(1, 4)
    frames = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256)) for _ in range(count - 1)]
    frames.insert(0, fdp.ConsumeBytes(fdp.remaining_bytes()))
    try:
        msg = protocol.decode(frames, LIMITS)
    except ProtocolError:
        return
    assert msg.kind in protocol.KINDS and type(msg.meta) is dict


OPENAI_KEYS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "top_k", "seed", "stop", "stream", "stream_options", "include_usage", "n",
               "logprobs", "top_logprobs", "echo", "suffix", "best_of", "presence_penalty",
               "logit_bias", "ignore_eos", "tools", "role", "content", "type", "text"]  # fmt: skip
ZMQ_KEYS = ["v", "type", "id", "prompt", "token_ids", "params", "stream", "key", "max_tokens",
            "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids", "ignore_eos",
            "logprobs"]  # fmt: skip


def value(fdp: atheris.FuzzedDataProvider, keys: list[str], depth: int = 0):
    """A JSON-like value drawn from the fuzzer's bytes; maps use the door's own keys, so that
    the fuzzer reaches past the first type check."""
    kind = fdp.ConsumeIntInRange(0, 8 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-2, 300)
    if kind == 3:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 10))  # up to 80-bit ints, either sign
    if kind == 4:
        return fdp.ConsumeFloat()  # NaN and infinities included
    if kind == 5:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 12))  # surrogates included
    if kind == 6:
        return fdp.PickValueInList(keys + ["tiny", "user", "assistant", "generate", "abort"])
    if kind == 7:
        return [value(fdp, keys, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    return {
        fdp.PickValueInList(keys): value(fdp, keys, depth + 1)
        for _ in range(fdp.ConsumeIntInRange(0, 6))
    }


def zmq(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        frame = fdp.ConsumeBytes(fdp.remaining_bytes())
    else:
        try:
            frame = msgpack.packb(value(fdp, ZMQ_KEYS), unicode_errors="surrogatepass")
        except (OverflowError, ValueError):
            return  # not msgpack-able (an int beyond 64 bits)
    try:
        messages.decode_request(frame, DOOR_LIMITS.max_request_bytes)
    except messages.BadMessage:
        return


def openai(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    body = value(fdp, OPENAI_KEYS)
    if not isinstance(body, dict):
        return  # the door answers 400 before parsing
    for parse in (
        lambda: openai_schema.parse_completion(body, DOOR_LIMITS, "tiny"),
        lambda: openai_schema.parse_chat(body, DOOR_LIMITS, "tiny", TOKENIZER),
    ):
        try:
            parse()
        except (InvalidRequest, messages.ServerError):
            pass


TARGETS = {"wire": wire, "zmq": zmq, "openai": openai}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
