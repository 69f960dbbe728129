"""KV events: what a KV cache stored and evicted, batched per step, for the router.

Why: a router that guesses which prefixes an instance holds (from what it sent
there) keeps sending requests to blocks that were evicted long ago, and one
that polls sees an eviction only at its next poll. vLLM's engines publish KV
events (BlockStored, BlockRemoved, AllBlocksCleared) once per step over ZMQ,
numbered per publisher, and Dynamo's KV router and llm-d's precise prefix
scorer keep an exact index from them. OmniRay does the same over Ray:

    producer (engine, global KV cache) --record()--> KVEventLog
    subscriber (the master) --await log.after(seq, epoch)--> batches since `seq`

`after` is a long poll: it returns as soon as a batch newer than `seq` exists
(or empty after `wait_s`), so an event reaches the subscriber one call return
after its step, with no polling interval. A subscriber that is new, restarted,
or too far behind (the log keeps the last `keep` batches) gets a full dump
instead: one batch with `cleared=True` and every hash held now, numbered with
the current sequence number, so the batches after it apply on top. `epoch`
names one life of the log: a producer that restarted numbers from 0 again, and
a subscriber holding the old epoch gets a dump.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

KEEP_BATCHES = 4096  # batches kept for subscribers that fall behind (then: a full dump)
WAIT_S = 1.0  # a long poll with nothing new returns empty after this (the caller asks again)


@dataclass(frozen=True)
class KVEventBatch:
    """One step's changes to a KV cache's set of block hashes, in order.

    `cleared`: the subscriber drops everything it holds for this source first
    (a full dump, a cache reset). Then `removed` are dropped and `stored` added.
    """

    epoch: str  # one life of the producer's log
    seq: int  # numbered per producer: 1, 2, 3, ... (a dump carries the latest number)
    time: float  # time.time() when recorded
    stored: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    cleared: bool = False


class KVEventLog:
    """The producer's side: number the batches, keep the recent ones, wake long polls.

    Lives in an async actor (the engine, the global KV cache): `record` and `after`
    run on its event loop, so a dump and the batches after it are consistent.
    """

    def __init__(self, dump: Callable[[], Iterable[int]], keep: int = KEEP_BATCHES):
        self.dump = dump  # every hash the cache holds now
        self.epoch = uuid.uuid4().hex[:12]
        self.seq = 0
        self.batches: deque[KVEventBatch] = deque(maxlen=keep)
        self._new: asyncio.Event | None = None  # made on first use, in the actor's loop

    def record(self, stored: Iterable[int] = (), removed: Iterable[int] = (), cleared: bool = False) -> None:
        """One step's changes; nothing is recorded for a step that changed nothing."""
        stored, removed = tuple(stored), tuple(removed)
        if not (stored or removed or cleared):
            return
        self.seq += 1
        self.batches.append(KVEventBatch(self.epoch, self.seq, time.time(), stored, removed, cleared))
        if self._new is not None:
            self._new.set()

    def full(self) -> KVEventBatch:
        """Everything held now, as one clearing batch numbered with the current seq."""
        return KVEventBatch(self.epoch, self.seq, time.time(), tuple(self.dump()), (), True)

    def _since(self, seq: int) -> list[KVEventBatch]:
        return [b for b in self.batches if b.seq > seq]

    async def after(self, seq: int | None, epoch: str | None, wait_s: float = WAIT_S) -> list[KVEventBatch]:
        """The batches after `seq` of `epoch`, waiting up to `wait_s` for one; a
        full dump when the subscriber is new (`seq` None), of another epoch, or
        further behind than the log keeps."""
        if seq is None or epoch != self.epoch or seq > self.seq:
            return [self.full()]
        oldest = self.batches[0].seq if self.batches else self.seq + 1
        if seq + 1 < oldest:
            return [self.full()]
        deadline = time.monotonic() + wait_s
        while self.seq == seq:
            if self._new is None:
                self._new = asyncio.Event()
            self._new.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            try:
                await asyncio.wait_for(self._new.wait(), left)
            except asyncio.TimeoutError:
                return []
        return self._since(seq)


class HashCounts:
    """Block hashes held by any of several caches (an instance's NPUs: a prefix may
    sit on more than one), turned into instance-level events: a hash is stored
    when its first holder registers it and removed when its last holder evicts it."""

    def __init__(self):
        self.counts: dict[int, int] = {}

    def apply(self, changes: Iterable[tuple[bool, int]]) -> tuple[list[int], list[int]]:
        """`changes`: (stored?, hash) in the order they happened. Returns the net
        (stored, removed) hashes at this level."""
        touched: dict[int, bool] = {}  # hash -> held before
        for stored, h in changes:
            n = self.counts.get(h, 0)
            touched.setdefault(h, n > 0)
            n += 1 if stored else -1
            if n > 0:
                self.counts[h] = n
            else:
                self.counts.pop(h, None)
        stored = [h for h, before in touched.items() if not before and h in self.counts]
        removed = [h for h, before in touched.items() if before and h not in self.counts]
        return stored, removed

    def reset(self, holders: Iterable[Iterable[int]]) -> tuple[list[int], list[int]]:
        """Recount from scratch (the set of caches changed); returns the net changes."""
        before = set(self.counts)
        self.counts = {}
        for hashes in holders:
            for h in hashes:
                self.counts[h] = self.counts.get(h, 0) + 1
        return [h for h in self.counts if h not in before], [h for h in before if h not in self.counts]
