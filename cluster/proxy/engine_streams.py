"""The consumer's side of the engines' output streams (actors/engine/consumers.py):
one Ray stream per engine, read by one task that hands each request's outputs to
the request's own queue.

`EngineStreams.open(engine, request)` sends the request at once (a parallel P/D
decode request must be parked before its prefill ends) and returns the
request's outputs as an async iterator, like iterating the engine's `generate`
stream would: a bad request raises from it, an engine that dies raises its
RayActorError from every open request. Closing the iterator early aborts the
request on the engine. A slow request's queue grows on its own; the reader
goes on, so other requests are not held up.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import ray

from actors.protocol import EngineOutput, EngineRequest


class _Reader:
    """The task that reads one engine's stream for this consumer."""

    def __init__(self, engine, consumer: str):
        # request -> [its queue, its choices still open]: a request whose last output
        # arrived leaves, read or not (a parked P/D decode request aborted unread)
        self.queues: dict[str, list] = {}
        self.error: BaseException | None = None
        self.task = asyncio.get_running_loop().create_task(self._read(engine.stream.remote(consumer)))

    async def _read(self, stream) -> None:
        try:
            async for ref in stream:
                for request_id, item in await ref:
                    entry = self.queues.get(request_id)
                    if entry is None:
                        continue
                    entry[0].put_nowait(item)
                    entry[1] -= isinstance(item, EngineOutput) and item.finished
                    if isinstance(item, BaseException) or entry[1] <= 0:
                        del self.queues[request_id]
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the engine (or its process) went away: every open request hears it
            self.error = err
            for queue, _ in self.queues.values():
                queue.put_nowait(err)
            self.queues.clear()

    @property
    def alive(self) -> bool:
        return self.error is None and not self.task.done()


class EngineStreams:
    """One consumer's streams, one per engine, in the event loop that opens them."""

    def __init__(self, name: str = "consumer"):
        self.consumer = f"{name}-{uuid.uuid4().hex[:12]}"
        self._readers: dict[str, _Reader] = {}

    def open(self, engine, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Send `request` to `engine` now; its outputs, as the engine streams them."""
        key = engine._actor_id.hex()
        reader = self._readers.get(key)
        if reader is None or not reader.alive:
            reader = self._readers[key] = _Reader(engine, self.consumer)
        queue = asyncio.Queue()
        reader.queues[request.request_id] = [queue, max(request.n, 1)]
        submitted = engine.submit.remote(request, self.consumer)
        return self._outputs(engine, reader, request, queue, submitted)

    @staticmethod
    async def _outputs(engine, reader: _Reader, request: EngineRequest, queue: asyncio.Queue, submitted):
        open_choices = max(request.n, 1)
        try:
            await submitted
            while open_choices:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                open_choices -= item.finished
                yield item
        finally:
            reader.queues.pop(request.request_id, None)
            if open_choices:  # left early (a stop string, the client gone, an error): free its KV
                try:
                    engine.abort.remote(request.request_id)
                except ray.exceptions.RayError:
                    pass

    def close(self) -> None:
        """Stop reading (the engines abort what this consumer left unfinished)."""
        for reader in self._readers.values():
            reader.task.cancel()
        self._readers.clear()
