"""The KV side of an NPU that both compute modes share: sizing the block pool
in the HBM ledger, and publishing blocks to the object store.

Published blocks are `ray.put` by the NPU; blocks with a prefix hash are also
indexed by the global KV cache actor, which takes its own copy (Ray 2.56+ has
no `_owner=` for ray.put), so indexed blocks outlive the NPU that computed them."""

from __future__ import annotations

import ray

from actors.hbm import HBMLedger
from actors.protocol import NPUBatch, NPUSpec

REAL_DEFAULT_KV_BLOCKS = 512  # real compute allocates host tensors: keep the default pool small


def blocks_loaded(batch: NPUBatch) -> dict[str, int]:
    """KV blocks the batch loads, by the link they cross: "intra_node" from an NPU
    on this one's node (an elastic migration within the instance), "inter_node"
    otherwise (another instance's, or the global cache's); only links used."""
    out: dict[str, int] = {}
    for w in batch.seqs:
        if w.load_blocks:
            link = "intra_node" if w.load_intra_node else "inter_node"
            out[link] = out.get(link, 0) + len(w.load_blocks)
    return out


def block_bytes(spec: NPUSpec) -> int:
    return spec.block_size * spec.model.kv_bytes_per_token()


def pool_blocks(spec: NPUSpec, free_bytes: int = 0) -> int:
    """The KV pool's size in blocks: the spec's, else real compute's default, else
    (emulated) its share of the HBM left free."""
    if spec.kv_blocks is not None:
        return spec.kv_blocks
    if spec.compute == "real":
        return REAL_DEFAULT_KV_BLOCKS
    return int(free_bytes * spec.kv_memory_fraction) // block_bytes(spec)


def reserve_pool(spec: NPUSpec, ledger: HBMLedger) -> int:
    """Charge the KV pool to the ledger (as vLLM preallocates it) and return its size in blocks."""
    n = pool_blocks(spec, ledger.free)
    ledger.charge("kv", "pool", n * block_bytes(spec))
    return n


class BlockPublisher:
    """Puts a step's saved KV blocks into the object store, one object for all of
    them, and tells the global KV cache which of them it may index, without
    waiting: the step returns as soon as the blocks are in the store."""

    def __init__(self, spec: NPUSpec):
        self.spec, self.nbytes = spec, block_bytes(spec)
        self._cache = None
        self._told = None  # the ref of the last put told to the cache (checked on the next one)

    def _cache_actor(self):
        if self._told is not None:  # a cache that failed the last put is looked up again
            done, _ = ray.wait([self._told], timeout=0)
            if done:
                self._told = None
                try:
                    ray.get(done[0])
                except ray.exceptions.RayActorError:
                    self._cache = None
        if self._cache is None and self.spec.kv_cache_name:
            try:
                self._cache = ray.get_actor(self.spec.kv_cache_name)
            except ValueError:
                self._cache = None  # no global cache: nothing is indexed
        return self._cache

    def publish(self, blocks: list[tuple[str, int | None]], data) -> dict[str, list]:
        """blocks: (seq id, prefix hash or None), one per row of `data` (an array,
        a block a row). Returns seq id -> [[ref, row], ...] in order: row `row` of
        the step's one object (readers take the row; the cache copies it out)."""
        ref = ray.put(data)
        exported: dict[str, list] = {}
        entries = []
        for row, (seq_id, block_hash) in enumerate(blocks):
            exported.setdefault(seq_id, []).append([ref, row])
            if block_hash is not None:
                entries.append((block_hash, [ref, row], self.nbytes))
        cache = self._cache_actor() if entries else None
        if cache is not None:
            # told, not awaited: the cache indexes them as it takes the call (a later match
            # sees them) and copies them out beside the next steps; a cache restarting or
            # gone costs only later misses, never the step
            self._told = cache.put.remote(entries)
        return exported
