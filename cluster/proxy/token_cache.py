"""Tokenizer result reuse, and the thread the slave tokenizes on.

Data flow: a request's prompt texts (chat: one per message) go to
:meth:`TokenCache.encode_many` on the event loop; cached ids come back at once,
the other texts go to the slave's :class:`TokenizerThread` as one job. The
thread takes every job waiting when it wakes and encodes their texts with one
``encode_batch`` call (the original Omni Proxy's tokenizer thread batches up to
256 requests the same way); the Rust side releases the GIL meanwhile, so the
event loop goes on serving the other requests. Block hashing
(``actors.kv_hash.block_hashes``, from ``Pipeline.run``) runs on the same thread
through :meth:`TokenizerThread.run`.

The cache itself lives on the event loop (no locks): only the encoding crosses
to the thread.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import sys
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cluster.proxy.tokens import Tokenizer

MAX_BATCH = 256  # jobs one encode_batch call takes at most (the original's batch)


@dataclass
class _Encode:
    texts: list[str]
    add_special_tokens: bool
    post: Callable | None  # applied on the thread to each text's ids


class TokenizerThread:
    """One daemon thread fed by a queue: encodes texts (batched across the jobs
    waiting) and runs other CPU work (block hashing) off the event loop. Started
    at the first job; results go back to each caller's own loop."""

    def __init__(self, tokenizer: Tokenizer, max_batch: int = MAX_BATCH):
        self.tokenizer, self.max_batch = tokenizer, max_batch
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batches = 0  # encode_batch calls
        self.texts = 0  # texts they encoded
        self.encode_s = 0.0  # time in them

    def submit(self, texts: Sequence[str], add_special_tokens: bool = True,
               post: Callable | None = None) -> asyncio.Future:
        """A future of the ids of each text (``post(ids)`` of each, when given)."""
        return self._put(_Encode(list(texts), add_special_tokens, post))

    async def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return await self.submit(texts, add_special_tokens)

    async def run(self, fn: Callable, *args):
        """``fn(*args)`` on the thread. Pure Python work still takes the GIL, but
        gives it back to the loop every switch interval (5 ms)."""
        return await self._put(functools.partial(fn, *args))

    def close(self) -> None:
        """Stop the thread once the jobs already queued are done."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _put(self, work) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="omniray-tokenizer", daemon=True)
                self._thread.start()
        self._jobs.put((work, loop, future))
        return future

    def _serve(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            jobs, closing = [first], False
            while len(jobs) < self.max_batch:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                    break
                jobs.append(job)
            self._work(jobs)
            if closing:
                return

    def _work(self, jobs: list) -> None:
        groups: dict[bool, list] = {}  # add_special_tokens -> its encode jobs, one encode_batch each
        for job in jobs:
            work, loop, future = job
            if isinstance(work, _Encode):
                groups.setdefault(work.add_special_tokens, []).append(job)
                continue
            try:
                _reply(loop, future, work())
            except Exception as err:
                _reply(loop, future, error=err)
        for flag, group in groups.items():
            self._encode(group, flag)

    def _encode(self, group: list, add_special_tokens: bool) -> None:
        texts = [t for work, _, _ in group for t in work.texts]
        t0 = time.perf_counter()
        try:
            ids = self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens) if texts else []
        except Exception as err:
            if len(group) > 1:  # one request's bad text (a lone surrogate) fails that request only
                for job in group:
                    self._encode([job], add_special_tokens)
                return
            _reply(group[0][1], group[0][2], error=err)
            return
        self.encode_s += time.perf_counter() - t0
        self.batches, self.texts = self.batches + 1, self.texts + len(texts)
        at = 0
        for work, loop, future in group:
            mine, at = ids[at : at + len(work.texts)], at + len(work.texts)
            try:
                _reply(loop, future, [work.post(i) for i in mine] if work.post else mine)
            except Exception as err:
                _reply(loop, future, error=err)


def _reply(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result=None, error: Exception | None = None):
    def settle():
        if future.done():  # its caller was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # that loop is closed: nobody waits any more
        pass


def entry_bytes(text: str, ids: array) -> int:
    """What one cache entry holds: the text as Python stores it (sys.getsizeof: 1, 2
    or 4 bytes a character plus its header) and 4 bytes an id (kept as array('i'))."""
    return sys.getsizeof(text) + ids.itemsize * len(ids)


def _with_array(ids: list[int]) -> tuple[list[int], array]:
    return ids, array("i", ids)


class TokenCache:
    """Tokenizer result reuse: the ids of a text are computed once per slave and
    reused by every later request with the same text (repeated prompts, chat
    histories re-sent each turn). LRU, bounded both in entries (`capacity`) and
    in bytes (`max_bytes`, counted by :func:`entry_bytes`): the oldest entries go
    until both bounds hold; a text larger than `max_bytes` is not kept. A text
    already being encoded for another request is waited for, not encoded again.
    Counts tokenizer runs (`calls`), reuses (`hits`) and time."""

    def __init__(self, tokenizer: Tokenizer, capacity: int = 4096, enabled: bool = True,
                 max_bytes: int = 64 << 20, thread: TokenizerThread | None = None):
        self.tokenizer, self.capacity, self.enabled, self.max_bytes = tokenizer, capacity, enabled, max_bytes
        self.thread = thread or TokenizerThread(tokenizer)
        self._lru: OrderedDict[str, array] = OrderedDict()
        self._pending: dict[str, tuple[asyncio.Future, int]] = {}  # text -> (its batch, its place in it)
        self.bytes = 0
        self.calls = self.hits = 0

    async def encode(self, text: str) -> list[int]:
        return (await self.encode_many([text]))[0]

    async def encode_segments(self, segments: Sequence[str]) -> list[int]:
        """Ids of "".join(segments), each segment looked up (or encoded) on its own;
        segments must begin at a tokenizer split point (see Tokenizer.chat_segments)."""
        return [i for ids in await self.encode_many(segments) for i in ids]

    async def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of each text: cached ones at once, the others in one job on the thread."""
        if not self.enabled:
            self.calls += len(texts)
            return await self.thread.encode_batch(texts)
        got: dict[str, list[int]] = {}  # (read before any await: an await may evict)
        waits: dict[str, tuple[asyncio.Future, int]] = {}
        new = []
        for t in dict.fromkeys(texts):
            if t in self._lru:
                self._lru.move_to_end(t)
                got[t] = self._lru[t].tolist()
            elif t in self._pending:
                waits[t] = self._pending[t]
            else:
                new.append(t)
        self.calls += len(new)
        self.hits += len(texts) - len(new)
        if new:
            batch = self.thread.submit(new, post=_with_array)
            for k, t in enumerate(new):
                self._pending[t] = waits[t] = (batch, k)
            batch.add_done_callback(functools.partial(self._store, new))
        for t, (batch, k) in waits.items():  # shielded: a cancelled request leaves the batch to the others
            got[t] = list((await asyncio.shield(batch))[k][0])
        out, seen = [], set()
        for t in texts:  # a text given twice gets its own copy
            out.append(list(got[t]) if t in seen else got[t])
            seen.add(t)
        return out

    def _store(self, texts: list[str], batch: asyncio.Future) -> None:
        for t in texts:
            if self._pending.get(t, (None,))[0] is batch:
                del self._pending[t]
        if batch.cancelled() or batch.exception() is not None:
            return
        for t, (_, ids) in zip(texts, batch.result()):
            self._put(t, ids)

    def _put(self, text: str, ids: array) -> None:
        size = entry_bytes(text, ids)
        if size > self.max_bytes or self.capacity == 0 or text in self._lru:
            return
        self._lru[text] = ids
        self.bytes += size
        while len(self._lru) > self.capacity or self.bytes > self.max_bytes:
            old, old_ids = self._lru.popitem(last=False)
            self.bytes -= entry_bytes(old, old_ids)

    def stats(self) -> dict:
        return {"tokenizer_calls": self.calls, "tokenizer_cache_hits": self.hits, "tokenizer_s": self.thread.encode_s,
                "tokenizer_batches": self.thread.batches, "tokenizer_cache_entries": len(self._lru),
                "tokenizer_cache_bytes": self.bytes}
