"""ForwardBatch: the tokens of one forward step, flattened over sequences.

Like vLLM's varlen layout: every new token of every sequence is one row; a
sequence's rows are contiguous and `slices()` says where each begins, how many
there are and at which absolute position the first one stands (= tokens of
that sequence already in the KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from actors.model.layers import rope_cos_sin


@dataclass(frozen=True)
class SeqSlice:
    seq_id: str
    offset: int  # first row of this sequence in the batch
    length: int  # new tokens of this sequence in this step
    start_pos: int  # absolute position of the first new token


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    seqs: list[SeqSlice]
    _rope: dict = field(default_factory=dict, repr=False)  # (dim, theta, dtype) -> (cos, sin), one per step

    def rope(self, dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of the batch's positions (rope_cos_sin), made once for every layer."""
        key = (dim, theta, dtype)
        if key not in self._rope:
            self._rope[key] = rope_cos_sin(self.positions, dim, theta, dtype)
        return self._rope[key]

    @classmethod
    def build(cls, items: list[tuple[str, list[int], int]]) -> "ForwardBatch":
        """items: (seq_id, new token ids, start position) per sequence."""
        ids: list[int] = []
        pos: list[int] = []
        seqs = []
        for seq_id, tokens, start in items:
            seqs.append(SeqSlice(seq_id, len(ids), len(tokens), start))
            ids.extend(tokens)
            pos.extend(range(start, start + len(tokens)))
        return cls(torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long), seqs)

    def slices(self) -> list[SeqSlice]:
        return self.seqs

    def last_rows(self) -> torch.Tensor:
        """Row of each sequence's last new token (where its next token is predicted)."""
        return torch.tensor([s.offset + s.length - 1 for s in self.seqs], dtype=torch.long)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
