"""BlockManager: the KV blocks of one NPU — who owns which, and which are cached.

Like vLLM's KV cache manager with automatic prefix caching: a full block is
named by the hash of its prefix chain; when its last owner frees it, it stays
cached (evictable, least recently used first) until its slot is needed, so a
later sequence with the same prefix attaches it instead of recomputing. Block
ids index the NPU's PagedKVStore. Every hash that becomes findable or is
evicted is noted in `events`, which the engine turns into KV events for the
router (actors.kv_events).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

import numpy as np


class BlockManager:
    """Per-block state in flat arrays, not lists of Python ints: an NPU of an
    emulated 72B has 10k blocks, and the engine builds or frees the managers of
    the NPUs a resize adds or drops while it serves. Lists cost that in
    proportion to the blocks (milliseconds for 8 managers); an array is one buffer."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_count = array("i", bytes(4 * num_blocks))
        self.block_hash: dict[int, int] = {}  # block id -> its prefix hash (registered blocks only)
        self.cached: dict[int, int] = {}  # hash -> block id
        self.free_ids = array("i", np.arange(num_blocks - 1, -1, -1, dtype=np.int32).tobytes())  # pop() takes 0 first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unowned; LRU first
        self.events: list[tuple[bool, int]] = []  # (stored?, hash) since the engine last took them

    @property
    def num_free(self) -> int:
        """Blocks a new allocation can take (free or evictable)."""
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match(self, hashes: list[int]) -> list[int]:
        """Cached blocks for the longest prefix of `hashes` (not yet attached)."""
        blocks = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def attach(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.ref_count[b] == 0:
                self.evictable.pop(b, None)
            self.ref_count[b] += 1

    def _take(self) -> int:
        if self.free_ids:
            b = self.free_ids.pop()
        else:
            b, _ = self.evictable.popitem(last=False)
            h = self.block_hash.pop(b)
            del self.cached[h]
            self.events.append((False, h))
        self.ref_count[b] = 1
        return b

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Extend a block table to hold num_tokens; False (and no change) if out of blocks."""
        need = self.blocks_needed(num_tokens) - len(table)
        if need > self.num_free:
            return False
        table.extend(self._take() for _ in range(max(need, 0)))
        return True

    def register(self, block: int, block_hash: int) -> None:
        """A block just filled: make it findable by its prefix hash."""
        if block not in self.block_hash and block_hash not in self.cached:
            self.block_hash[block] = block_hash
            self.cached[block_hash] = block
            self.events.append((True, block_hash))

    def take_events(self) -> list[tuple[bool, int]]:
        """The (stored?, hash) changes since the last call, in order."""
        events, self.events = self.events, []
        return events

    def release(self, table: list[int]) -> None:
        for b in reversed(table):  # tail blocks first, so a prefix outlives its suffix
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                if b not in self.block_hash:
                    self.free_ids.append(b)
                else:
                    self.evictable[b] = None
        table.clear()
