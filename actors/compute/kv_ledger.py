"""Charges each sequence's KV cache to the HBM ledger, a step's new tokens at a time."""

from __future__ import annotations

from actors.hbm import HBMLedger


class KVCharges:
    def __init__(self, ledger: HBMLedger, bytes_per_token: int):
        self.ledger, self.bytes_per_token = ledger, bytes_per_token
        self._keys: dict[str, list[str]] = {}

    def charge(self, seq_id: str, start_pos: int, num_tokens: int) -> None:
        key = f"{seq_id}@{start_pos}"
        self.ledger.charge("kv", key, num_tokens * self.bytes_per_token)
        self._keys.setdefault(seq_id, []).append(key)

    def release(self, seq_id: str) -> None:
        for key in self._keys.pop(seq_id, []):
            self.ledger.release("kv", key)
