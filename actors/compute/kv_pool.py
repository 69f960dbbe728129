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
    def __init__(self, spec: NPUSpec):
        self.spec, self.nbytes = spec, block_bytes(spec)
        self._cache = None

    def _cache_actor(self):
        if self._cache is None and self.spec.kv_cache_name:
            try:
                self._cache = ray.get_actor(self.spec.kv_cache_name)
            except ValueError:
                self._cache = None  # no global cache: nothing is indexed
        return self._cache

    def publish(self, blocks: list[tuple[str, int | None, object]]) -> dict[str, list]:
        """blocks: (seq id, prefix hash or None, data). Returns seq id -> [[ref], ...] in order."""
        cache = self._cache_actor()
        exported: dict[str, list] = {}
        entries = []
        for seq_id, block_hash, data in blocks:
            ref = ray.put(data)
            exported.setdefault(seq_id, []).append([ref])
            if block_hash is not None and cache is not None:
                entries.append((block_hash, [ref], self.nbytes))
        if entries:
            try:
                ray.get(cache.put.remote(entries))  # indexed before the step returns: a later match sees them
            except ray.exceptions.RayActorError:
                # the cache is restarting or gone: blocks not indexed cost only a later miss,
                # never the step (the sequences keep their blocks); a gone one is looked up again
                self._cache = None
        return exported
