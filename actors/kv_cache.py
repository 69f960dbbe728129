"""The global KV cache: one named actor that indexes KV blocks by prefix-chain hash.

The block tensors live in the Ray object store, not in this actor. What must hold
is that a block outlives the NPU actor that computed it, so its owner must be
this actor: in Ray an object dies with its owner. `ray.put(x, _owner=cache)`
did that but was removed in Ray 2.56, so ownership is taken instead: the producer
does a plain `ray.put(block)` and calls `put` with the refs; `put` starts one
zero-CPU task `_adopt` per call whose return values are the blocks. A task's
returns are owned by its caller (this actor) and stored on the node that ran it;
Ray's locality-aware scheduling runs it where its arguments are, i.e. on the
producer's node. Cost: one memcpy in that node's shared memory per block written.
Readers still get the block zero-copy. `put` returns after the copy is done,
so a producer that waited for `put` may drop its refs or die; an NPU does not
wait (its step goes on), and its blocks are readable through its own refs
until the copies are made.

This actor keeps only (hash -> ref, nbytes) in an LRU. Dropping an entry drops its
reference, which lets the object store free the block once no reader still
borrows it. Refs travel wrapped in one-element lists: Ray resolves ObjectRefs
passed as top-level arguments, and the cache must never fetch the blocks itself.

Hashes come from `actors.kv_hash.block_hashes`, the same ones the proxy and the
engines compute, so a match here is a match of the whole prefix up to that block.
What is stored and evicted goes out as KV events (actors.kv_events), which the
master follows to mirror the index for routing.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import ray
from ray.actor import ActorHandle

from actors.kv_events import KVEventBatch, KVEventLog

KV_CACHE_NAME = "omniray_kv_cache"
logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_retries=0)
def _adopt(rows: list[int | None], *objects):
    """Return block i as object i (row rows[i] of objects[i] when it is a producer's
    step object holding several blocks), plus a small marker that comes back inline
    to the caller.

    All returns of a task are done together, so awaiting the marker awaits them all
    without pulling the blocks into the cache's process. No retries: lost arguments
    (producer died first) cannot be re-fetched anyway.
    """
    return (*(obj if row is None else obj[row] for obj, row in zip(objects, rows)), True)


class _Block:
    __slots__ = ("src", "nbytes", "hits", "last_use")

    def __init__(self, src: list, nbytes: int):
        # what a reader loads: [ref] of a block this actor owns, or, until its copy
        # is made, the producer's [ref, row] (row `row` of the producer's step object)
        self.src, self.nbytes, self.hits, self.last_use = src, nbytes, 0, time.monotonic()


class GlobalKVCache:
    """Hash -> block ref index with an LRU byte budget.

    An async actor: every method runs on one event loop thread and only `put`
    yields (while its copies are made). A put indexes its new blocks before it
    yields, with the producer's refs, so a `match` that comes after it sees them
    at once (a producer need not wait for the copies); once they are made, the
    entries still there point at this actor's copies. Counters: `hits` = blocks
    matched, `misses` = blocks of a `match` query after its matched prefix (all
    of them, not just the first, so hits + misses = blocks queried), `evictions`
    = blocks dropped for capacity (not `evict`/`clear`), `puts` = blocks newly
    stored. `clear` and `evict` leave the counters alone.
    """

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # LRU first, MRU last
        self._bytes = 0
        self.hits = self.misses = self.evictions = self.puts = 0
        self.kv_log = KVEventLog(lambda: list(self._blocks))

    async def put(self, entries: list[tuple[int, list, int]]) -> int:
        """Adopt (hash, [ref] or [ref, row], nbytes) entries; return how many were
        newly stored, once this actor owns their copies.

        A hash already present keeps its first block (same prefix, same KV) and is
        only moved to most-recently-used. A block larger than the whole capacity is
        not stored. New blocks are indexed at once (with the producer's refs: see
        the class doc), then LRU blocks are evicted until bytes <= capacity (this
        call's blocks are the most recent, so they go last), then the copies are
        made (see module doc). If that fails (the producer died first), this
        call's blocks leave the index again, which only costs recomputation.
        """
        fresh: dict[int, _Block] = {}
        for h, src, nbytes in entries:
            if h in self._blocks:
                self._touch(h)
            elif h not in fresh and nbytes <= self.capacity_bytes:
                fresh[h] = _Block(list(src), int(nbytes))
        if not fresh:
            return 0
        self._blocks.update(fresh)
        self._bytes += sum(b.nbytes for b in fresh.values())
        self.puts += len(fresh)
        evicted = []
        while self._bytes > self.capacity_bytes:
            h, block = self._blocks.popitem(last=False)
            self._bytes -= block.nbytes
            self.evictions += 1
            evicted.append(h)
        self.kv_log.record([h for h in fresh if h in self._blocks], [h for h in evicted if h not in fresh])
        *owned, done = _adopt.options(num_returns=len(fresh) + 1).remote(
            [b.src[1] if len(b.src) > 1 else None for b in fresh.values()], *(b.src[0] for b in fresh.values()))
        try:
            await done  # other calls (match, ...) run meanwhile
        except Exception as e:  # noqa: BLE001 - any failure means: not cached
            logger.warning("KV cache: adopting %d blocks failed: %s", len(fresh), e)
            gone = [h for h, b in fresh.items() if self._blocks.get(h) is b]
            for h in gone:
                self._bytes -= self._blocks.pop(h).nbytes
            self.puts -= len(fresh)
            self.kv_log.record(removed=gone)
            return 0
        for block, ref in zip(fresh.values(), owned):
            block.src = [ref]  # (an entry evicted meanwhile is no one's: its copy goes with it)
        return len(fresh)

    def match(self, hashes: list[int]) -> dict:
        """Longest cached prefix of `hashes`: {"num_blocks": n, "refs": [src, ...]},
        each src [ref] or [ref, row] (see _Block).

        Matched blocks become most-recently-used and count a hit each; the query's
        remaining blocks count as misses. A gap ends the match even if later
        hashes are present: KV after a missing block cannot be used without it.
        """
        refs = []
        for h in hashes:
            block = self._blocks.get(h)
            if block is None:
                break
            block.hits += 1
            self._touch(h)
            refs.append(block.src)
        n = len(refs)
        self.hits += n
        self.misses += len(hashes) - n
        return {"num_blocks": n, "refs": refs}

    def hashes(self) -> list[int]:
        """Every indexed block hash."""
        return list(self._blocks)

    async def kv_events(self, after: int | None = None, epoch: str | None = None) -> list[KVEventBatch]:
        """KV events after `after` (a long poll; a full dump for a new subscriber):
        the master mirrors the index from these (actors.kv_events)."""
        return await self.kv_log.after(after, epoch)

    def contains(self, hashes: list[int]) -> list[bool]:
        """Presence of each hash; changes neither stats nor LRU order (a probe)."""
        return [h in self._blocks for h in hashes]

    def evict(self, hashes: list[int]) -> int:
        """Drop these blocks (e.g. known stale); return how many were present."""
        dropped = []
        for h in hashes:
            block = self._blocks.pop(h, None)
            if block is not None:
                self._bytes -= block.nbytes
                dropped.append(h)
        self.kv_log.record(removed=dropped)
        return len(dropped)

    def clear(self) -> int:
        """Drop every block; return how many there were."""
        n = len(self._blocks)
        self._blocks.clear()
        self._bytes = 0
        self.kv_log.record(cleared=True)
        return n

    def stats(self) -> dict:
        return {
            "blocks": len(self._blocks),
            "bytes": self._bytes,
            "capacity_bytes": self.capacity_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "puts": self.puts,
        }

    def _touch(self, h: int) -> None:
        self._blocks.move_to_end(h)
        self._blocks[h].last_use = time.monotonic()


_GlobalKVCacheActor = ray.remote(GlobalKVCache)  # GlobalKVCache itself stays a plain class


def get_or_create_kv_cache(
    capacity_bytes: int, name: str = KV_CACHE_NAME, namespace: str | None = None
) -> ActorHandle:
    """The cluster's one cache actor, created on first call (`get_if_exists`).

    If it already exists, its capacity stays as created; `capacity_bytes` is ignored.
    num_cpus=0: it only does dict work and must not take a CPU slot from engines.
    Not detached: it lives as long as the job that created it (the serving driver).
    max_restarts=-1: if its process dies it comes back empty. The blocks it owned
    are lost with it (their refs raise OwnerDiedError), which only costs
    recomputation; readers treat a failed `ray.get` of a block like a miss. Calls
    are not retried (max_task_retries=0): after a restart a caller gets an error
    and the next call finds the new, empty index.
    """
    return _GlobalKVCacheActor.options(
        name=name,
        namespace=namespace,
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
        max_task_retries=0,
    ).remote(capacity_bytes)
