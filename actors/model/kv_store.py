"""SequenceKVStore: per-sequence, per-layer KV tensors grown step by step.

The reference generate() and the NPU runtime both use it, so their attention
sees exactly the same cached tensors. Each entry is a tuple (K, V for GQA;
latent and RoPE key for MLA) of tensors [tokens, ...]."""

from __future__ import annotations

import torch


class SequenceKVStore:
    def __init__(self) -> None:
        self._kv: dict[str, dict[int, tuple[torch.Tensor, ...]]] = {}

    def append(self, seq_id: str, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = self._kv.setdefault(seq_id, {})
        old = layers.get(layer)
        full = new if old is None else tuple(torch.cat([o, n]) for o, n in zip(old, new))
        layers[layer] = full
        return full

    def append_batch(self, layer: int, batch, *new: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """append() for each sequence of `batch` (a ForwardBatch), its rows of `new`."""
        return [self.append(s.seq_id, layer, *(t[s.offset:s.offset + s.length] for t in new)) for s in batch.slices()]

    def length(self, seq_id: str) -> int:
        layers = self._kv.get(seq_id)
        return int(layers[0][0].shape[0]) if layers and 0 in layers else 0

    def export(self, seq_id: str) -> dict[int, tuple[torch.Tensor, ...]]:
        return dict(self._kv.get(seq_id, {}))

    def load(self, seq_id: str, layers: dict[int, tuple[torch.Tensor, ...]]) -> None:
        self._kv[seq_id] = dict(layers)

    def free(self, seq_id: str) -> None:
        self._kv.pop(seq_id, None)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._kv
