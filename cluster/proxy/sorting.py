"""Weighted request sorting: the order in which the master serves its queues.

Why: FIFO lets one long prompt hold up many short ones (head-of-line blocking,
bad mean TTFT). The Omni Proxy sorts the prefill queue by a weight that puts
short prompts first and lets long waits catch up, and sorts the decode queue
longest first. This module computes exactly those weights, recomputed each
round from the queue as it is now, and goes further than the original in one
way: its starvation timeout is ENFORCED on both queues (the original has the
setting but never applies it): a request that waited ``starvation_ms`` goes
before all others, oldest first, and the master holds the line for it (nothing
behind it is dispatched while it does not fit), so no request waits much past
``starvation_ms`` plus the time for room to free up.

Prefill weight of request i (descending):

    token_i = (max_prompt - prompt_i) / max_prompt
    time_i  = waited_ms_i / max(max_waited_ms, min_wait_norm_ms)
    weight  = token_weight * token_i + time_weight * time_i

where max_prompt and max_waited_ms are taken over the queue. Requests with
``waited_ms >= starvation_ms`` go before all others, oldest first. Waits are
in device time: wall time / ``time_scale`` (an emulated manifest's, else 1), so
an experiment slowed down by its time scale keeps the order and the bound.

Decode weight (descending, longest first; starved requests first, as above):

    weight = (prompt_i + decode_max_tokens_weight * max_tokens_i) / max_total

Ties are broken by arrival time, then request_id, so the order is deterministic.
With ``enabled=False`` both orders are plain FIFO (arrival, then request_id)
and the master serves the prefill queue first come, first served: the first
request that fits nowhere holds the line (with sorting, whatever fits goes).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class QueuedRequest:
    """What the scheduler knows of a waiting request (no prompt text: counts and hashes)."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    arrival_s: float  # on the master's monotonic clock
    block_hashes: list[int] = field(default_factory=list)  # full-block prefix hash chain
    cached_tokens: int = 0
    global_depth: int = 0  # leading prompt blocks found in the global KV cache (set by the master)


@dataclass(frozen=True)
class SortingConfig:
    """Every constant of the sort is a setting, so A/B runs can switch it off or retune it."""

    enabled: bool = True
    token_weight: float = 0.8
    time_weight: float = 0.2
    min_wait_norm_ms: float = 50.0  # floor of the waiting-time normaliser (the original's 50 ms)
    starvation_ms: float = 400.0  # waited this long: served first, whatever its length
    decode_max_tokens_weight: float = 0.0
    time_scale: float = 1.0  # wall seconds per device second (emulated); waits are in device time


def _fifo_key(r: QueuedRequest) -> tuple[float, str]:
    return (r.arrival_s, r.request_id)


class WeightedSorter:
    """Orders the prefill and decode queues; stateless, so the master can call it every round."""

    def __init__(self, config: SortingConfig | None = None):
        self.config = config or SortingConfig()

    def waited_ms(self, r: QueuedRequest, now_s: float) -> float:
        """Device milliseconds `r` has waited."""
        return max(0.0, (now_s - r.arrival_s) * 1000.0 / self.config.time_scale)

    def prefill_weights(self, queue: list[QueuedRequest], now_s: float) -> list[float]:
        """The prefill weight of each request (the module docstring's formula), aligned with ``queue``."""
        if not queue:
            return []
        c = self.config
        max_prompt = max(max(r.prompt_tokens for r in queue), 1)
        norm = max(max(self.waited_ms(r, now_s) for r in queue), c.min_wait_norm_ms)
        return [
            c.token_weight * (max_prompt - r.prompt_tokens) / max_prompt + c.time_weight * self.waited_ms(r, now_s) / norm
            for r in queue
        ]

    def starved(self, r: QueuedRequest, now_s: float) -> bool:
        """Waited the starvation bound: it goes first, and the master holds the line for it."""
        return self.waited_ms(r, now_s) >= self.config.starvation_ms

    def _order(self, queue: list[QueuedRequest], weights: list[float], now_s: float) -> list[QueuedRequest]:
        """Starved requests first (oldest first), then the rest by weight, descending."""
        starved, rest = [], []
        for r, w in zip(queue, weights):
            if self.starved(r, now_s):
                starved.append(r)
            else:
                rest.append((w, r))
        rest.sort(key=lambda wr: (-wr[0], *_fifo_key(wr[1])))
        return sorted(starved, key=_fifo_key) + [r for _, r in rest]

    def prefill_order(self, queue: list[QueuedRequest], now_s: float) -> list[QueuedRequest]:
        """Starved requests first (oldest first), then the rest by prefill weight; FIFO when disabled."""
        if not self.config.enabled:
            return sorted(queue, key=_fifo_key)
        return self._order(queue, self.prefill_weights(queue, now_s), now_s)

    def decode_weights(self, queue: list[QueuedRequest]) -> list[float]:
        """The decode weight of each request, (prompt + k * max_tokens) / max_total, aligned with ``queue``."""
        k = self.config.decode_max_tokens_weight
        totals = [r.prompt_tokens + k * r.max_tokens for r in queue]
        max_total = max(max(totals, default=1.0), 1e-9)  # all-zero queue: weights 0, order = FIFO
        return [t / max_total for t in totals]

    def decode_order(self, queue: list[QueuedRequest], now_s: float) -> list[QueuedRequest]:
        """Starved requests first (oldest first), then longest first (the decode
        weight, descending); FIFO when disabled."""
        if not self.config.enabled:
            return sorted(queue, key=_fifo_key)
        return self._order(queue, self.decode_weights(queue), now_s)
