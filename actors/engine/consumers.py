"""Output streams by consumer: one Ray stream per (consumer, engine), not one per
request.

A consumer (a proxy slave, a benchmark) opens one `stream` on an engine and
sends its requests with `submit`. Each step, every update of every one of its
requests goes out as one item, a list of (request id, EngineOutput or the
exception that failed it), and the consumer fans them out. A streamed item
costs about as much as a Ray call, so at batch 32 a stream per request spends
more host time than the step's bookkeeping; one per consumer pays it once.

The engine never waits for a consumer: an item is queued when the step ends
and yielded at once, whether or not the consumer has read the last one (Ray
buffers it), so a slow reader delays only itself. A consumer that goes away
(its stream closed or its process gone) has its unfinished requests aborted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from actors.protocol import EngineOutput


def stamps_as_ages(out: EngineOutput, now: float) -> None:
    """An output's lifecycle stamps (monotonic times) as their ages when it leaves
    the engine: the receiver has its own clock."""
    if out.stamps:
        out.stamps = {stage: now - t for stage, t in out.stamps.items()}


@dataclass
class ConsumerStream:
    """What is waiting for one consumer, and which of its requests are open."""

    items: list[tuple[str, object]] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    requests: set[str] = field(default_factory=set)

    def take(self) -> list[tuple[str, object]]:
        """Everything queued since the last take, its lifecycle stamps turned
        into ages as it leaves (the receiver has its own clock)."""
        items, self.items = self.items, []
        self.ready.clear()
        now = time.monotonic()
        for _, out in items:
            if isinstance(out, EngineOutput):
                stamps_as_ages(out, now)
        return items


class RequestSink:
    """Where the engine puts one request's outputs when a consumer stream carries
    them: the per-request queue's `put_nowait`, so the engine emits the same way
    to either. Its last output (every choice finished, or an error) closes it."""

    def __init__(self, stream: ConsumerStream, request_id: str, choices: int, closed: Callable[[str], None]):
        self.stream, self.request_id, self.open_choices, self.closed = stream, request_id, max(choices, 1), closed

    def put_nowait(self, item: object) -> None:
        self.stream.items.append((self.request_id, item))
        self.stream.ready.set()
        if isinstance(item, EngineOutput):
            self.open_choices -= item.finished
        if isinstance(item, Exception) or self.open_choices <= 0:
            self.stream.requests.discard(self.request_id)
            self.closed(self.request_id)
