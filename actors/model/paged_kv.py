"""PagedKVStore: an NPU's KV cache as fixed-size blocks, as in vLLM's PagedAttention.

The engine's block manager decides which block ids a sequence owns (its block
table); this store only holds the tensors: per layer, one tensor per cached
quantity shaped [num_blocks, block_size, ...]. Before a forward, `bind` tells
it each sequence's block table; attention then calls `append`, which writes
the new tokens into their slots and returns the sequence's whole context
gathered from its blocks — the same contract as SequenceKVStore.
"""

from __future__ import annotations

import numpy as np
import torch

from actors.model.config import ModelConfig
from actors.model.shared_tensor import from_shared


def kv_shapes(cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Per-token shape of each cached tensor of one layer."""
    if cfg.attention == "mla":
        return [(cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)]
    return [(cfg.num_kv_heads, cfg.head_dim)] * 2


class PagedKVStore:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, num_layers: int | None = None):
        self.block_size = block_size
        layers = num_layers or cfg.num_layers + cfg.num_mtp_layers  # MTP layers cache like main ones
        self.pool = [[torch.zeros(num_blocks, block_size, *s, dtype=dtype) for s in kv_shapes(cfg)] for _ in range(layers)]
        self._tables: dict[str, list[int]] = {}
        self._starts: dict[str, int] = {}

    def bind(self, seq_id: str, block_table: list[int], start: int) -> None:
        """This step, seq_id's new tokens start at `start` and live in these blocks."""
        self._tables[seq_id] = block_table
        self._starts[seq_id] = start

    def unbind_all(self) -> None:
        self._tables.clear()
        self._starts.clear()

    def _slots(self, seq_id: str, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        table = torch.tensor(self._tables[seq_id], dtype=torch.long)
        pos = torch.arange(start, stop)
        return table[pos // self.block_size], pos % self.block_size

    def append(self, seq_id: str, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        start = self._starts[seq_id]
        stop = start + new[0].shape[0]
        blocks, offsets = self._slots(seq_id, start, stop)
        all_blocks, all_offsets = self._slots(seq_id, 0, stop)
        out = []
        for pool, t in zip(self.pool[layer], new):
            pool[blocks, offsets] = t
            out.append(pool[all_blocks, all_offsets])
        return tuple(out)

    def export_stacked(self, blocks: list[int]) -> np.ndarray:
        """The blocks as one array [len(blocks), block_size, width], every cached
        tensor of every layer flattened side by side; each row is what
        import_blocks reads for a block. One gather per tensor for all the
        blocks: a migrating sequence moves a dozen at once, and a copy per block
        and tensor is most of what that costs."""
        idx = torch.tensor(blocks, dtype=torch.long)
        parts = [t[idx].reshape(len(blocks), self.block_size, -1) for layer in self.pool for t in layer]
        return torch.cat(parts, dim=2).numpy()

    def export_blocks(self, blocks: list[int]) -> list[np.ndarray]:
        """Each block as an array of its own (the global KV cache keeps one object a block)."""
        whole = self.export_stacked(blocks)
        return [whole[i].copy() for i in range(len(blocks))]

    def import_blocks(self, blocks: list[int], data: list) -> None:
        """Fill `blocks` from export_blocks' arrays (or the store's read-only views
        of them), one scatter per tensor."""
        if not blocks:
            return
        idx = torch.tensor(blocks, dtype=torch.long)
        src = torch.stack([from_shared(d) for d in data])
        col = 0
        for layer in self.pool:
            for t in layer:
                width = int(np.prod(t.shape[2:]))
                t[idx] = src[:, :, col : col + width].reshape(len(blocks), *t.shape[1:]).to(t.dtype)
                col += width
