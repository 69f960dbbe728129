"""PrefixBook: an engine's prefix-cache bookkeeping, apart from its step.

Each sequence's prefix-chain hashes (actors.kv_hash: the proxy's, extended as
its blocks fill), the naming of filled blocks in their NPU's block manager
(local prefix caching), and the KV events that leave the engine: the hashes
its NPUs stored and evicted, one batch a step, counted over all its NPUs
(actors.kv_events), which the master follows to route by prefix.
"""

from __future__ import annotations

from actors.engine.block_manager import BlockManager
from actors.engine.sequence import Sequence
from actors.kv_events import HashCounts, KVEventBatch, KVEventLog
from actors.kv_hash import ROOT, hash_block


class PrefixBook:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.chains: dict[str, list[int]] = {}  # seq id -> prefix-chain hashes of its full blocks so far
        self.held = HashCounts()  # prefix hashes cached on any of the engine's NPUs
        self.log = KVEventLog(lambda: list(self.held.counts))

    def chain(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Prefix-chain hashes of the full blocks within seq's first num_tokens tokens."""
        bs = self.block_size
        chain = self.chains.setdefault(seq.seq_id, list(seq.request.block_hashes or []))
        tokens = seq.token_ids
        while (len(chain) + 1) * bs <= min(num_tokens, len(tokens)):
            i = len(chain)
            chain.append(hash_block(chain[-1] if chain else ROOT, tokens[i * bs : (i + 1) * bs]))
        return chain[: num_tokens // bs]

    def register(self, seq: Sequence, manager: BlockManager) -> None:
        """Name the blocks the sequence filled by their prefix hash in its NPU's manager."""
        chain = self.chain(seq, seq.num_computed)
        for i in range(seq.registered_blocks, len(chain)):
            manager.register(seq.block_table[i], chain[i])
        seq.registered_blocks = max(seq.registered_blocks, len(chain))

    def forget(self, seq: Sequence) -> None:
        self.chains.pop(seq.seq_id, None)

    def publish(self, managers: list[BlockManager]) -> None:
        """The prefix hashes stored and evicted on any NPU since the last call, as one batch."""
        changes = [e for m in managers for e in m.take_events()]
        if changes:
            self.log.record(*self.held.apply(changes))

    def recount(self, managers: list[BlockManager]) -> None:
        """The set of NPUs changed (a resize, a rebuild): what the instance holds now,
        recounted, goes out as one batch of the differences."""
        for m in managers:
            m.take_events()  # the recount includes them
        self.log.record(*self.held.reset(m.cached for m in managers))

    async def events(self, after: int | None, epoch: str | None) -> list[KVEventBatch]:
        return await self.log.after(after, epoch)
