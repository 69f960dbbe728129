"""Per-instance budgets: how much work the master lets an instance hold.

Why: if an instance takes every request it is sent, the queue that decides
the order is the engine's (first come, first served) and the master's
weighted sorting orders an empty queue. The original Omni Proxy gives an
instance a request only while it is under its token and sequence budgets
(`max_batch_num_token` 32,000, `prefill_max_num_seqs` 32,
`decode_max_num_seqs` 32); the rest wait in the master's queues, sorted.

The master makes every change to an `InstanceLoad` itself (dispatch, prefill
done, decode assignment, finish), so the load it routes by is exact, not a
poll of the engine:

    prefill budget (prefill and mixed instances): requests being prefilled
        < prefill_max_num_seqs, and their uncached prompt tokens plus the new
        request's <= max_batch_num_token (a request larger than the whole
        budget goes alone, onto an instance with nothing in prefill);
    sequence budget (decode and mixed instances): requests there, from
        dispatch to finish, < decode_max_num_seqs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Budgets:
    max_batch_num_token: int = 32000
    prefill_max_num_seqs: int = 32
    decode_max_num_seqs: int = 32


@dataclass
class InstanceLoad:
    """The requests the master has on one instance, by phase."""

    role: str  # "prefill" | "decode" | "mixed"
    prefilling: dict[str, int] = field(default_factory=dict)  # request -> uncached prompt tokens still to prefill
    decoding: dict[str, int] = field(default_factory=dict)  # request -> prompt + max_tokens (its decode tokens)

    @property
    def running(self) -> int:
        """Requests here, each counted once."""
        return len(self.prefilling) + len(self.decoding)

    @property
    def queued_tokens(self) -> int:
        return sum(self.prefilling.values())

    @property
    def decode_tokens(self) -> int:
        return sum(self.decoding.values())

    def fits_prefill(self, uncached_tokens: int, budgets: Budgets) -> bool:
        if len(self.prefilling) >= budgets.prefill_max_num_seqs:
            return False
        if self.prefilling and self.queued_tokens + uncached_tokens > budgets.max_batch_num_token:
            return False
        return self.role != "mixed" or self.running < budgets.decode_max_num_seqs

    def fits_decode(self, budgets: Budgets) -> bool:
        return len(self.decoding) < budgets.decode_max_num_seqs

    def start_prefill(self, request_id: str, uncached_tokens: int) -> None:
        self.prefilling[request_id] = uncached_tokens

    def start_decode(self, request_id: str, total_tokens: int) -> None:
        self.decoding[request_id] = total_tokens

    def prefill_done(self, request_id: str, total_tokens: int) -> bool:
        """The prompt is computed: its tokens leave the queue; on a mixed instance
        the request goes on decoding here. False if it was not prefilling here."""
        if self.prefilling.pop(request_id, None) is None:
            return False
        if self.role == "mixed":
            self.decoding[request_id] = total_tokens
        return True

    def finish(self, request_id: str) -> bool:
        """The request left (finished, failed, cancelled). False if it was not here."""
        return (self.prefilling.pop(request_id, None) is not None) | (self.decoding.pop(request_id, None) is not None)
