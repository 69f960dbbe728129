"""The 10-stage request lifecycle: one timestamp per stage, each gap a metric.

Why: TTFT alone does not say where the time went. The Omni Proxy stamps every
request at each step from receipt to completion; OmniRay does the same over
ten stages so that a slow request can be attributed to tokenizing, queueing,
prefill, the KV transfer or decode, and each gap can feed a histogram.

Each stage is stamped where it happens:

| stage | where | when |
| --- | --- | --- |
| received, tokenized | slave | the request arrived; its prompt is token ids |
| prefix_matched | master | its block hashes were matched against every instance's prefix index and the global one |
| queued | master | it entered the prefill queue |
| prefill_scheduled | master | the dispatcher gave it to a prefill (or mixed) instance |
| prefill_done | prefill / mixed engine | the step that completed its prompt (and sampled the first token) ended |
| decode_scheduled | decode engine (P/D) | its first step there was scheduled |
| kv_transferred | decode engine (P/D) | that step's load of the prompt's KV was done |
| first_token | slave | the first token went to the client |
| finished | slave | the request ended |

The decode instance loads the KV at the start of its first step for the
request (as a vLLM KV connector does), so decode_scheduled comes before
kv_transferred; the client's first token comes from the decode instance's
first output, as in the original Omni Proxy's P/D modes. In sequential P/D
the master's decode queue sits between prefill_done and decode_scheduled.

A remote stage arrives as its age when the answer left the master or the
engine (`stamp_ages`), and is stamped on this clock: no two processes (or
nodes) need to share a clock, and a stage is never placed before its cause
(the error is the answer's transit time, which places it later). The first
stamp of a stage wins (re-stamping is a no-op), so a retry cannot move a
stage later. Gaps follow the canonical STAGES order: each stamped stage is
measured from the previous *stamped* stage, so a mixed request, which never
stamps decode_scheduled or kv_transferred, gets one prefill_done->first_token
gap bridging them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

STAGES = (
    "received",
    "tokenized",
    "prefix_matched",
    "queued",
    "prefill_scheduled",
    "prefill_done",
    "decode_scheduled",
    "kv_transferred",
    "first_token",
    "finished",
)
_STAGE_SET = frozenset(STAGES)


class Lifecycle:
    """Stage timestamps of one request."""

    def __init__(self, request_id: str, clock: Callable[[], float] = time.monotonic):
        self.request_id = request_id
        self.clock = clock
        self._stamps: dict[str, float] = {}
        self.route: dict = {}  # where it ran: prefill and decode instance, mode, cached blocks

    def stamp(self, stage: str, t: float | None = None) -> None:
        """Record ``stage`` at ``t`` (default: now). Unknown stage -> ValueError; the first stamp is kept."""
        if stage not in _STAGE_SET:
            raise ValueError(f"unknown lifecycle stage {stage!r}; stages are {', '.join(STAGES)}")
        if stage not in self._stamps:
            self._stamps[stage] = self.clock() if t is None else t

    def copy(self) -> Lifecycle:
        """Another request's lifecycle, stamped as far as this one is (a prompt of a
        request with several: each runs on its own from here)."""
        other = Lifecycle(self.request_id, self.clock)
        other._stamps = dict(self._stamps)
        return other

    def stamp_ages(self, ages: dict[str, float], at: float | None = None) -> None:
        """Stages that happened elsewhere, each `age` seconds before `at` (default: now)."""
        now = self.clock() if at is None else at
        for stage, age in ages.items():
            self.stamp(stage, now - age)

    @property
    def stamps(self) -> dict[str, float]:
        """stage -> absolute time, in STAGES order (a copy)."""
        return {s: self._stamps[s] for s in STAGES if s in self._stamps}

    def gaps(self) -> dict[str, float]:
        """"a->b" -> seconds from each stamped stage a to the next stamped stage b, in STAGES order."""
        out: dict[str, float] = {}
        prev: str | None = None
        for stage, t in self.stamps.items():
            if prev is not None:
                out[f"{prev}->{stage}"] = t - self._stamps[prev]
            prev = stage
        return out

    def between(self, a: str, b: str) -> float | None:
        """Seconds from stage a to stage b, or None unless both are stamped."""
        if a in self._stamps and b in self._stamps:
            return self._stamps[b] - self._stamps[a]
        return None

    @property
    def ttft_s(self) -> float | None:
        """received -> first_token, or None until both are stamped."""
        return self.between("received", "first_token")

    @property
    def e2e_s(self) -> float | None:
        """received -> finished, or None until both are stamped."""
        return self.between("received", "finished")

    def tpot_s(self, completion_tokens: int) -> float | None:
        """(finished - first token) / (tokens - 1): time per output token after the first."""
        decode_s = self.between("first_token", "finished")
        return decode_s / (completion_tokens - 1) if decode_s is not None and completion_tokens > 1 else None

    def to_debug(self) -> dict:
        """For a response's ``debug`` field: stamps relative to ``received`` (or to the
        earliest stamp if received is missing), in seconds, and the gaps."""
        stamps = self.stamps
        origin = stamps.get("received", min(stamps.values(), default=0.0))
        return {
            "request_id": self.request_id,
            "route": dict(self.route),
            "stages": {s: t - origin for s, t in stamps.items()},
            "gaps": self.gaps(),
            "ttft_s": self.ttft_s,
            "e2e_s": self.e2e_s,
        }
