"""PagedKVStore: an NPU's KV cache as fixed-size blocks, as in vLLM's PagedAttention.

The engine's block manager decides which block ids a sequence owns (its block
table); this store only holds the tensors: per layer, one tensor per cached
quantity shaped [num_blocks, block_size, ...]. Before a forward, `bind` tells
it each sequence's block table; attention then calls `append_batch`, which
writes the step's new tokens into their slots and returns each sequence's
whole context gathered from its blocks, the same contract as SequenceKVStore.
The slot mapping is made once a step (`plan`), so a layer costs one scatter and
one gather per cached tensor, whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actors.model.config import ModelConfig
from actors.model.shared_tensor import from_shared


def kv_shapes(cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Per-token shape of each cached tensor of one layer."""
    if cfg.attention == "mla":
        return [(cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)]
    return [(cfg.num_kv_heads, cfg.head_dim)] * 2


@dataclass(frozen=True)
class SlotPlan:
    """One step's slot mapping (slot = block * block_size + offset), made once for
    every layer: where each new row is written, and which slots hold each
    sequence's whole context (its new rows included), sequence after sequence."""

    write: torch.Tensor  # [rows of the batch], in batch row order
    read: torch.Tensor  # [sum of context lengths]
    lengths: list[int]  # context length of each sequence, in batch order


class PagedKVStore:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, num_layers: int | None = None):
        self.block_size = block_size
        layers = num_layers or cfg.num_layers + cfg.num_mtp_layers  # MTP layers cache like main ones
        self.pool = [[torch.zeros(num_blocks, block_size, *s, dtype=dtype) for s in kv_shapes(cfg)] for _ in range(layers)]
        self._tables: dict[str, list[int]] = {}
        self._starts: dict[str, int] = {}
        self._plan: tuple[object, SlotPlan] | None = None  # (the batch it maps, its plan)

    def bind(self, seq_id: str, block_table: list[int], start: int) -> None:
        """This step, seq_id's new tokens start at `start` and live in these blocks."""
        self._tables[seq_id] = block_table
        self._starts[seq_id] = start
        self._plan = None

    def unbind_all(self) -> None:
        self._tables.clear()
        self._starts.clear()
        self._plan = None

    def plan(self, batch) -> SlotPlan:
        """The slot mapping of `batch` (a ForwardBatch of bound sequences), made on
        its first layer and reused by the others."""
        if self._plan is not None and self._plan[0] is batch:
            return self._plan[1]
        writes, reads, lengths = [], [], []
        for seq in batch.slices():
            start = self._starts[seq.seq_id]
            stop = start + seq.length
            pos = np.arange(stop)
            slots = np.asarray(self._tables[seq.seq_id], dtype=np.int64)[pos // self.block_size] * self.block_size \
                + pos % self.block_size
            writes.append(slots[start:])
            reads.append(slots)
            lengths.append(stop)
        plan = SlotPlan(torch.from_numpy(np.concatenate(writes)), torch.from_numpy(np.concatenate(reads)), lengths)
        self._plan = (batch, plan)
        return plan

    def append_batch(self, layer: int, batch, *new: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Write every sequence's new rows of `layer` (one scatter per cached
        tensor) and return each sequence's whole context (one gather per tensor,
        split by sequence): the same contract as SequenceKVStore.append_batch."""
        plan = self.plan(batch)
        contexts = []
        for pool, rows in zip(self.pool[layer], new):
            flat = pool.view(-1, *pool.shape[2:])
            flat[plan.write] = rows
            contexts.append(flat[plan.read].split(plan.lengths))
        return list(zip(*contexts))

    def export_stacked(self, blocks: list[int]) -> np.ndarray:
        """The blocks as one array [len(blocks), block_size, width], every cached
        tensor of every layer flattened side by side; each row is what
        import_blocks reads for a block. One gather per tensor for all the
        blocks: a migrating sequence moves a dozen at once, and a copy per block
        and tensor is most of what that costs."""
        idx = torch.tensor(blocks, dtype=torch.long)
        parts = [t[idx].reshape(len(blocks), self.block_size, -1) for layer in self.pool for t in layer]
        return torch.cat(parts, dim=2).numpy()

    def import_blocks(self, blocks: list[int], data: list) -> None:
        """Fill `blocks` from rows of export_stacked's arrays (or the store's
        read-only views of them), one scatter per tensor."""
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
