"""Malformed requests for the ingress fuzz tests (tests/test_serve.py): HTTP bodies
for /v1/completions and /v1/chat/completions, and gRPC GenerateRequest bytes.
Everything is drawn from a seeded random.Random, so a failure reproduces."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from pydantic_core import from_json

from cluster.proxy import omniray_pb2 as pb
from cluster.proxy.protocol import ChatCompletionRequest, CompletionRequest

MODEL = "tiny-gqa-moge"
COMPLETION = {"model": MODEL, "prompt": "fuzz", "max_tokens": 1}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "fuzz"}], "max_tokens": 1}
# JSON text that json.dumps cannot write (json.loads reads NaN and Infinity; a lone surrogate is an escape)
RAW_ATOMS = ["NaN", "-Infinity", "Infinity", '"\\ud800"', '"\\udfff x"', "1e999", "-0", "1" * 5000, "0.1e-400"]


@dataclass
class Payload:
    path: str
    body: bytes
    content_type: str | None = "application/json"
    valid_locally: bool = False  # the request model accepts it (the server may still refuse: vocab, context)


def _atom(rng: random.Random):
    return rng.choice([
        None, True, False, 0, -1, 1, 2, 3, 17, -(2**63), 2**63, 2**64 + 1, 10**30, -(10**30), 0.5, -0.0, 1e308, -1e308,
        2.5, "", "NaN", "nan", "inf", "-Infinity", "1", "true", "null", "x" * rng.randint(1, 300), "\u0000", "\ud7ff\ue000",
        "😀" * 3, "\u202e", "<|endoftext|>", "{}", "[]",
    ])


def garbage(rng: random.Random, depth: int = 0):
    """Any JSON value: atoms, lists and objects of them, a few levels deep."""
    kind = rng.random()
    if depth > 3 or kind < 0.55:
        return _atom(rng)
    if kind < 0.8:
        return [garbage(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["role", "content", "type", "text", "name", "schema", "json_schema", "include_usage", "0", "-5", ""]
    return {rng.choice(keys + ["k" * rng.randint(1, 9)]): garbage(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _message(rng: random.Random):
    if rng.random() < 0.3:
        return garbage(rng)
    msg = {"role": rng.choice(["user", "system", "assistant", "developer", "tool", "wizard", "", None, 3]),
           "content": rng.choice(["hi", "", None, 5, [], [{"type": "text", "text": "a"}], [{"type": "image_url"}],
                                  [{"type": "text", "text": 7}], garbage(rng)])}
    if rng.random() < 0.2:
        msg[rng.choice(["name", "tool_calls", "refusal", "extra"])] = garbage(rng)
    return msg


def _fields(model) -> list[str]:
    return sorted(model.model_fields)


def _mutated(rng: random.Random, chat: bool) -> dict:
    body = dict(CHAT if chat else COMPLETION)
    fields = _fields(ChatCompletionRequest if chat else CompletionRequest) + ["frobnicate"]
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(fields)
        if name == "messages":
            body[name] = [_message(rng) for _ in range(rng.randint(0, 3))]
        elif rng.random() < 0.1:
            body.pop(name, None)
        else:
            body[name] = garbage(rng)
    return body


def _locally_valid(body: bytes, chat: bool) -> bool:
    """Whether the request model accepts it, parsed as the slave parses bodies."""
    try:
        (ChatCompletionRequest if chat else CompletionRequest).model_validate(from_json(body))
    except Exception:  # any refusal: the server must refuse it too
        return False
    return True


def _raw(rng: random.Random, path: str, chat: bool) -> Payload:
    """Bytes no request model sees: broken JSON, wrong shapes, raw atoms, bad UTF-8."""
    text = json.dumps(CHAT if chat else COMPLETION)
    kind = rng.randrange(8)
    if kind == 0:  # truncated
        body = text[: rng.randrange(len(text))].encode()
    elif kind == 1:  # invalid UTF-8 somewhere inside
        raw = bytearray(text.encode())
        raw[rng.randrange(len(raw))] = rng.choice([0xFF, 0xC3, 0x80, 0xED])
        body = bytes(raw)
    elif kind == 2:  # not an object
        body = json.dumps(garbage(rng) if rng.random() < 0.5 else [garbage(rng)]).encode()
        body = body if not body.startswith(b"{") else b"[" + body + b"]"
    elif kind == 3:  # an atom json.dumps cannot write, in a field
        field = rng.choice(["max_tokens", "temperature", "top_p", "seed", "n", "prompt", "stop", "logit_bias", "model"])
        body = text[:-1].encode() + f', "{field}": {rng.choice(RAW_ATOMS)}}}'.encode()
    elif kind == 4:  # nested past any parser's stack
        depth = rng.choice([1000, 20000, 30000])
        body = f'{{"model": "{MODEL}", "prompt": {"[" * depth}{"]" * depth}}}'.encode()
    elif kind == 5:  # random bytes
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    elif kind == 6:  # duplicate keys, trailing garbage, comments
        body = rng.choice([text[:-1] + ', "model": 5}', text + " x", text + "\n}", "// c\n" + text, text.replace(":", "=")])
        body = body.encode()
    else:
        body = b"".join(rng.choice([b"{", b"}", b"[", b"]", b'"', b":", b",", b"1", b"null", b" "])
                        for _ in range(rng.randint(1, 60)))
    return Payload(path, body)


def http_payloads(seed: int, count: int) -> list[Payload]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        chat = rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        roll = rng.random()
        if roll < 0.9:  # JSON values in the fields, or bytes no JSON writer would write
            body = json.dumps(_mutated(rng, chat)).encode() if roll < 0.6 else _raw(rng, path, chat).body
            out.append(Payload(path, body, valid_locally=_locally_valid(body, chat)))
        else:  # a fine body under a content type the API does not take
            ctype = rng.choice([None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                "application/xml", "json", ""])
            out.append(Payload(path, json.dumps(CHAT if chat else COMPLETION).encode(), ctype))
    return out


# ---- gRPC --------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bad_message(rng: random.Random) -> pb.GenerateRequest:
    """A well-formed GenerateRequest with values the API refuses (or, by chance, accepts)."""
    req = pb.GenerateRequest(model=MODEL, prompt="fuzz", max_tokens=1)
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(["model", "prompt", "prompt_token_ids", "messages", "max_tokens", "temperature", "top_p",
                           "top_k", "seed", "stop", "both"])
        if name == "model":
            req.model = rng.choice(["", "gpt-9", "x" * 500, MODEL + " "])
        elif name == "prompt":
            req.prompt = rng.choice(["", "\u0000", "😀" * 100, "<|endoftext|>"])
        elif name == "prompt_token_ids":
            req.prompt_token_ids[:] = [rng.choice([-1, -(2**31), 2**31 - 1, 0, 10**6]) for _ in range(rng.randint(0, 5))]
        elif name == "messages":
            req.ClearField("prompt")
            for _ in range(rng.randint(0, 3)):
                req.messages.add(role=rng.choice(["user", "", "wizard", "tool", "system"]),
                                 content=rng.choice(["", "hi", "\ud7ff"]))
        elif name == "max_tokens":
            req.max_tokens = rng.choice([0, 2**32 - 1, 10**6])
        elif name in ("temperature", "top_p"):
            setattr(req, name, rng.choice([float("nan"), float("inf"), -1.0, 0.0, 3.0, -float("inf"), 1e38]))
        elif name == "top_k":
            req.top_k = rng.choice([2**32 - 1, 10**6, 0])
        elif name == "seed":
            req.seed = rng.choice([-(2**63), 2**63 - 1, -1])
        elif name == "stop":
            req.stop[:] = rng.choice([[""], ["a"] * 9, ["x" * 1000]])
        else:
            req.messages.add(role="user", content="both")
    return req


def grpc_payloads(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.3:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 120))))
        elif roll < 0.75:
            out.append(_bad_message(rng).SerializeToString())
        elif roll < 0.9:  # wire-level damage: invalid UTF-8 in a string, a bad tag, a length past the end
            good = pb.GenerateRequest(model=MODEL, prompt="fuzz", max_tokens=1).SerializeToString()
            out.append(rng.choice([
                good + _field(2, 2, _varint(2) + b"\xff\xfe"),
                good + _field(1, 2, _varint(3) + b"\xc3\x28a"),
                good + _field(4, 2, _varint(4) + _field(1, 2, _varint(2) + b"\xed\xa0")),
                good + _varint(0),
                good + _field(2, 2, _varint(1000) + b"short"),
                good + _field(9, 7, b""),
                good[: rng.randrange(1, len(good))],
            ]))
        else:  # packed token ids: varints of any size, or cut short
            ids = b"".join(_varint(rng.choice([0, 5, 2**31, 2**64 - 1, 2**35])) for _ in range(rng.randint(1, 6)))
            cut = ids if rng.random() < 0.7 else ids[:-1] + b"\x80"
            out.append(_field(1, 2, _varint(len(MODEL)) + MODEL.encode()) + _field(3, 2, _varint(len(ids)) + cut))
    return out
