"""How an NPU computes a step: `real` (torch math on its shard) or `emulated`
(no math; the cost model's time for the chosen chip, a deterministic stand-in
for tokens). Both charge the same HBM ledger and take the same NPUBatch."""

from __future__ import annotations

from typing import Protocol

from actors.protocol import NPUBatch, NPUStepResult


class Compute(Protocol):
    def load_weights(self, weight_refs: dict | None) -> None:
        """Take this NPU's weights (refs into the object store), charging the ledger."""

    def step(self, batch: NPUBatch) -> NPUStepResult: ...

    def free(self, seq_id: str) -> None:
        """Drop a sequence's KV and its ledger charge."""

    def expert_load(self) -> dict[int, list[int]]:
        """Token-expert pairs routed per logical expert, per MoE layer, since start."""
