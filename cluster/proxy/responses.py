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
    full_choice: Callable[[str, str | None], dict]
    delta_choice: Callable[[str, str | None], dict]
    opening_delta: dict | None = None  # chat: the assistant role, before any content


COMPLETION = ResponseKind(
    "cmpl", CompletionResponse, CompletionStreamChunk,
    full_choice=lambda text, finish: {"index": 0, "text": text, "finish_reason": finish},
    delta_choice=lambda text, finish: {"index": 0, "text": text, "finish_reason": finish},
)
CHAT = ResponseKind(
    "chatcmpl", ChatCompletionResponse, ChatCompletionChunk,
    full_choice=lambda text, finish: {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": finish},
    delta_choice=lambda text, finish: {"index": 0, "delta": {"content": text}, "finish_reason": finish},
    opening_delta={"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
)


def usage(delta, completion_tokens: int | None = None) -> dict:
    """OpenAI's usage, with the prompt tokens served from a KV cache (as OpenAI and vLLM report them);
    `completion_tokens`: a count other than the delta's (the chat stream's opening chunk: 0)."""
    done = delta.completion_tokens if completion_tokens is None else completion_tokens
    return {"prompt_tokens": delta.prompt_tokens, "completion_tokens": done,
            "total_tokens": delta.prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": delta.cached_tokens}}


def _envelope(kind: ResponseKind) -> dict[str, Any]:
    return {"id": f"{kind.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time())}


async def collect(kind: ResponseKind, model: str, deltas: AsyncIterator,
                  debug: Callable[[], dict] | None = None) -> dict:
    """The whole response body once generation ends (with `debug()` in it when given)."""
    text, last = "", None
    async for d in deltas:
        text, last = text + d.text, d
    body = kind.response(**_envelope(kind), model=model, usage=usage(last),
                         choices=[kind.full_choice(text, last.finish_reason)], debug=debug() if debug else None)
    return body.model_dump(exclude_none=True)


async def stream(kind: ResponseKind, model: str, deltas: AsyncIterator, include_usage: bool,
                 continuous_usage: bool = False) -> AsyncIterator[str]:
    """Server-sent events: one chunk per delta, usage last if asked, then [DONE].
    `continuous_usage` (vLLM's continuous_usage_stats): every chunk carries the usage so far."""
    env, last = _envelope(kind), None

    def chunk(choices: list, use: dict | None = None) -> str:
        return sse(kind.chunk(**env, model=model, choices=choices, usage=use))

    opening = kind.opening_delta
    async for d in deltas:
        if opening:  # sent with the first delta in hand (already pulled): its usage knows the prompt
            yield chunk([opening], usage(d, 0) if continuous_usage else None)
            opening = None
        last = d
        yield chunk([kind.delta_choice(d.text, d.finish_reason)], usage(d) if continuous_usage else None)
    if opening:
        yield chunk([opening])
    if include_usage and last is not None:
        yield chunk([], usage(last))
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
