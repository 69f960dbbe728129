"""Turning a stream of text deltas into OpenAI responses: one body, or SSE chunks.

/v1/completions and /v1/chat/completions differ only in how a choice is
shaped (``text`` vs ``message``/``delta``) and the chat stream's opening
role chunk; ``COMPLETION`` and ``CHAT`` hold those differences and the two
functions below do the rest for both.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from cluster.proxy.choices import TokenText, best, chat_logprobs, completion_logprobs, entries_of
from cluster.proxy.protocol import (
    SSE_DONE,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    CompletionStreamChunk,
    sse,
)


@dataclass(frozen=True)
class ResponseKind:
    id_prefix: str
    response: type
    chunk: type
    full_choice: Callable[[int, str, str | None], dict]
    delta_choice: Callable[[int, str, str | None], dict]
    # a choice's logprobs in this API's shape, from (token id, TokenLogprob | None) entries
    logprobs: Callable[[list, TokenText, int], dict]
    opening_delta: Callable[[int], dict] | None = None  # chat: the assistant role, before any content


COMPLETION = ResponseKind(
    "cmpl", CompletionResponse, CompletionStreamChunk,
    full_choice=lambda i, text, finish: {"index": i, "text": text, "finish_reason": finish},
    delta_choice=lambda i, text, finish: {"index": i, "text": text, "finish_reason": finish},
    logprobs=completion_logprobs,
)
CHAT = ResponseKind(
    "chatcmpl", ChatCompletionResponse, ChatCompletionChunk,
    full_choice=lambda i, text, finish: {"index": i, "message": {"role": "assistant", "content": text},
                                         "finish_reason": finish},
    delta_choice=lambda i, text, finish: {"index": i, "delta": {"content": text}, "finish_reason": finish},
    logprobs=lambda entries, token_text, _offset: chat_logprobs(entries, token_text),
    opening_delta=lambda i: {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
)


@dataclass
class Shape:
    """What shapes one request's answer besides its deltas."""

    kind: ResponseKind
    model: str
    n: int = 1  # choices generated per prompt (best_of when larger than the choices answered)
    keep: int = 1  # choices answered per prompt (n)
    token_text: TokenText | None = None  # set when the request asked for logprobs: shows them


class Tally:
    """Usage across a request's choices: each prompt counted once, every choice's tokens."""

    def __init__(self, n: int):
        self.n = n
        self.prompt: dict[int, int] = {}
        self.cached: dict[int, int] = {}
        self.completion: dict[int, int] = {}

    def add(self, d) -> None:
        p = d.index // self.n
        self.prompt[p] = d.prompt_tokens
        self.cached[p] = max(self.cached.get(p, 0), d.cached_tokens)
        self.completion[d.index] = d.completion_tokens

    def usage(self, completion_tokens: int | None = None) -> dict:
        """OpenAI's usage, with the prompt tokens served from a KV cache (as OpenAI and vLLM report
        them); `completion_tokens`: a count other than the tally's (the chat stream's opening chunk: 0)."""
        done = sum(self.completion.values()) if completion_tokens is None else completion_tokens
        prompt = sum(self.prompt.values())
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached.values())}}


def _envelope(kind: ResponseKind) -> dict[str, Any]:
    return {"id": f"{kind.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time())}


async def collect(shape: Shape, deltas: AsyncIterator, debug: Callable[[], dict] | None = None) -> dict:
    """The whole response body once generation ends (with `debug()` in it when given)."""
    kind, tally = shape.kind, Tally(shape.n)
    choices: dict[int, dict] = {}
    async for d in deltas:
        tally.add(d)
        c = choices.setdefault(d.index, {"index": d.index, "text": "", "finish": None, "entries": []})
        c["text"] += d.text
        c["finish"] = d.finish_reason or c["finish"]
        c["entries"] += entries_of(d)
    ordered = [choices[i] for i in sorted(choices)]
    kept = best(choices, shape.keep, shape.n) if shape.keep < shape.n else ordered
    out = []
    for i, c in enumerate(kept):
        choice = kind.full_choice(i, c["text"], c["finish"])
        if shape.token_text is not None:
            choice["logprobs"] = kind.logprobs(c["entries"], shape.token_text, 0)
        out.append(choice)
    body = kind.response(**_envelope(kind), model=shape.model, usage=tally.usage(), choices=out,
                         debug=debug() if debug else None)
    return body.model_dump(exclude_none=True)


async def stream(shape: Shape, deltas: AsyncIterator, include_usage: bool,
                 continuous_usage: bool = False) -> AsyncIterator[str]:
    """Server-sent events: one chunk per delta, usage last if asked, then [DONE].
    `continuous_usage` (vLLM's continuous_usage_stats): every chunk carries the usage so far."""
    kind, env, tally = shape.kind, _envelope(shape.kind), Tally(shape.n)
    opened: set[int] = set()
    offsets: dict[int, int] = {}  # per choice: the text streamed so far (completions' text_offset)

    def chunk(choices: list, use: dict | None = None) -> str:
        return sse(kind.chunk(**env, model=shape.model, choices=choices, usage=use))

    async for d in deltas:
        tally.add(d)
        if kind.opening_delta and d.index not in opened:  # with the first delta in hand: its usage knows the prompt
            opened.add(d.index)
            yield chunk([kind.opening_delta(d.index)], tally.usage(0) if continuous_usage else None)
        choice = kind.delta_choice(d.index, d.text, d.finish_reason)
        if shape.token_text is not None:
            choice["logprobs"] = kind.logprobs(entries_of(d), shape.token_text, offsets.get(d.index, 0))
        offsets[d.index] = offsets.get(d.index, 0) + len(d.text)
        yield chunk([choice], tally.usage() if continuous_usage else None)
    if kind.opening_delta and not opened:
        yield chunk([kind.opening_delta(0)])
    if include_usage and tally.prompt:
        yield chunk([], tally.usage())
    yield SSE_DONE


async def first_then_rest(gen: AsyncIterator) -> AsyncIterator:
    """Pull the first item now, so that errors before the first byte still get a
    status code, and return an iterator over all items."""
    try:
        first = await gen.__anext__()
    except StopAsyncIteration:
        first = None

    async def chained():
        if first is not None:
            yield first
        async for d in gen:
            yield d

    return chained()
