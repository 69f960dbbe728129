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
so a producer that waited for `put` may drop its refs or die.

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
def _adopt(*blocks):
    """Return the blocks, plus a small marker that comes back inline to the caller.

    All returns of a task are done together, so awaiting the marker awaits them all
    without pulling the blocks into the cache's process. No retries: lost arguments
    (producer died first) cannot be re-fetched anyway.
    """
    return (*blocks, True)


class _Block:
    __slots__ = ("ref", "nbytes", "hits", "last_use")

    def __init__(self, ref: ray.ObjectRef, nbytes: int):
        self.ref, self.nbytes, self.hits, self.last_use = ref, nbytes, 0, time.monotonic()


class GlobalKVCache:
    """Hash -> block ref index with an LRU byte budget.

    An async actor: every method runs on one event loop thread and only `put`
    yields (while its copies are made), at a point where it holds no LRU state, so
    the LRU needs no lock and a slow put does not hold up `match`.
    Counters: `hits` = blocks matched, `misses` = blocks of a `match` query after
    its matched prefix (all of them, not just the first, so hits + misses = blocks
    queried), `evictions` = blocks dropped for capacity (not `evict`/`clear`),
    `puts` = blocks newly stored. `clear` and `evict` leave the counters alone.
    """

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # LRU first, MRU last
        self._bytes = 0
        self.hits = self.misses = self.evictions = self.puts = 0
        self.kv_log = KVEventLog(lambda: list(self._blocks))

    async def put(self, entries: list[tuple[int, list[ray.ObjectRef], int]]) -> int:
        """Adopt (hash, [ref], nbytes) entries; return how many were newly stored.

        A hash already present keeps its first block (same prefix, same KV) and is
        only moved to most-recently-used. A block larger than the whole capacity is
        not stored. New blocks are copied into refs this actor owns (see module doc);
        if that fails (the producer died first), none of this call's blocks is
        stored, which only costs recomputation. Then LRU blocks are evicted until
        bytes <= capacity; this call's blocks are the most recent, so they go last.
        """
        fresh: dict[int, tuple[ray.ObjectRef, int]] = {}
        for h, (ref,), nbytes in entries:
            if h in self._blocks:
                self._touch(h)
            elif h not in fresh and nbytes <= self.capacity_bytes:
                fresh[h] = (ref, int(nbytes))
        if not fresh:
            return 0
        *owned, done = _adopt.options(num_returns=len(fresh) + 1).remote(*(r for r, _ in fresh.values()))
        try:
            await done  # other calls (match, ...) run meanwhile
        except Exception as e:  # noqa: BLE001 - any failure means: not cached
            logger.warning("KV cache: adopting %d blocks failed: %s", len(fresh), e)
            return 0
        stored, evicted = [], []
        for (h, (_, nbytes)), ref in zip(fresh.items(), owned):
            if h in self._blocks:  # stored by a concurrent put while we waited
                self._touch(h)
                continue
            self._blocks[h] = _Block(ref, nbytes)
            self._bytes += nbytes
            stored.append(h)
        self.puts += len(stored)
        while self._bytes > self.capacity_bytes:
            h, block = self._blocks.popitem(last=False)
            self._bytes -= block.nbytes
            self.evictions += 1
            evicted.append(h)
        new = set(stored)
        self.kv_log.record([h for h in stored if h in self._blocks], [h for h in evicted if h not in new])
        return len(stored)

    def match(self, hashes: list[int]) -> dict:
        """Longest cached prefix of `hashes`: {"num_blocks": n, "refs": [[ref], ...]}.

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
            refs.append([block.ref])
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
