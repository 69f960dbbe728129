"""ElasticMoE autoscaler: the decision part of the policy loop.

A policy loop that scales instances and EP size from queue length, KV usage and
TTFT/TPOT SLO attainment, with bounds and cool-down. Every `interval_s` the caller
gathers a `ClusterSignals` snapshot and calls `AutoscalerPolicy.decide(signals, now)`;
every decision is logged (`logging.getLogger(__name__).info`, with its reason) and
returned, so the caller can carry it out, export it as a metric, and then call
`record(decision, now)` to start the cool-down. This module is pure: no Ray, no I/O
beyond logging; `decide()` never mutates the policy (only `record()` does). `enabled`
is for the caller: the policy decides whenever asked.

Rules, per role present among healthy non-draining ("active") instances:

* dispatch role: the master's queue (`queue_length`, requests not yet dispatched) is
  attributed to `prefill` when both prefill and decode instances are active, else to
  `mixed` (if no such role is active, the queue is attributed to no role); the
  master's decode queue (`decode_queue_length`, prefilled requests waiting for a
  decode instance under its budget) to `decode`.
* pressure = (attributed master queue + the role's `waiting`) / active instances of the role.
* kv = the largest `kv_usage` of the role's active instances.
* SLO missed: TTFT attainment < `slo_target` (affects the dispatch role: prefill or
  mixed) or TPOT attainment < `slo_target` (affects decode, or mixed). An SLO whose
  `ttft_slo_s` / `tpot_slo_s` is None is not considered; attainment None (no data) is met.
* scale OUT when pressure > `queue_high` or kv > `kv_high` or an SLO is missed:
  - vertical (the default `prefer`): grow the most loaded (running + waiting) active
    instance that can grow to its next allowed EP size: double it if that is allowed
    and within [`min_ep`, `max_ep`], else the smallest allowed larger size within them
    (`ep_choices(n)` says whether n is allowed, e.g. num_experts % n == 0);
  - if no instance can grow (or `prefer` is horizontal): add an instance of the role,
    when the role has fewer than `max_instances` instances (all of them counted,
    unhealthy and draining too, as they still hold NPUs), with the EP of the role's
    existing instances (the most common one, ties to the larger; moved into the bounds
    to the nearest allowed size when outside them);
  - prefer horizontal and the role at `max_instances`: grow an instance as above.
* scale IN when pressure <= `queue_low` and kv < `kv_low` and no SLO is missed (neither
  TTFT nor TPOT, whichever role it affects: no scaling in while any SLO is missed):
  remove the least loaded active instance when the role has more than one active
  instance and more than `min_instances`; else shrink the active instance with the
  largest EP that can shrink to its next smaller allowed size (halve it if allowed and
  within the bounds, else the largest allowed smaller size >= `min_ep`).
* at most one decision per role per call; roles are visited prefill, decode, mixed,
  then any other role in name order.
* cool-down: a role is skipped when any decision for it was recorded within
  `cooldown_s` before `now` (now - t < cooldown_s).
* unhealthy or draining instances are never acted on, and their signals are ignored.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

_ROLE_ORDER = {"prefill": 0, "decode": 1, "mixed": 2}


class AutoscalerConfig(BaseModel):
    """The manifest's `autoscaler:` section."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    interval_s: float = Field(2.0, gt=0)  # how often the loop decides
    cooldown_s: float = Field(10.0, ge=0)  # no new action on the same role within this
    min_ep: int = Field(1, gt=0)  # EP size bounds of one instance
    max_ep: int = Field(8, gt=0)
    min_instances: int = Field(1, ge=0)  # per role (prefill/decode/mixed)
    max_instances: int = Field(4, gt=0)
    queue_high: float = Field(4.0, gt=0)  # waiting requests per instance above which a role scales out
    queue_low: float = Field(0.5, ge=0)  # below which (with KV low and SLO met) it may scale in
    kv_high: float = Field(0.85, gt=0, le=1)  # KV block usage fraction
    kv_low: float = Field(0.3, ge=0, le=1)
    ttft_slo_s: float | None = Field(None, gt=0)  # None: SLO not considered
    tpot_slo_s: float | None = Field(None, gt=0)
    slo_target: float = Field(0.9, gt=0, le=1)  # attainment below which a role scales out
    prefer: Literal["vertical", "horizontal"] = "vertical"  # grow an instance's EP first, or add instances first

    @model_validator(mode="after")
    def _order(self) -> "AutoscalerConfig":
        if self.max_ep < self.min_ep:
            raise ValueError(f"max_ep ({self.max_ep}) is below min_ep ({self.min_ep})")
        if self.max_instances < self.min_instances:
            raise ValueError(f"max_instances ({self.max_instances}) is below min_instances ({self.min_instances})")
        if self.queue_high < self.queue_low:
            raise ValueError(f"queue_high ({self.queue_high}) is below queue_low ({self.queue_low})")
        if self.kv_high < self.kv_low:
            raise ValueError(f"kv_high ({self.kv_high}) is below kv_low ({self.kv_low})")
        return self


@dataclass
class InstanceSignals:
    name: str
    role: str
    ep: int
    healthy: bool = True
    draining: bool = False
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # 0..1 fraction of KV blocks in use

    @property
    def load(self) -> int:
        return self.running + self.waiting

    @property
    def active(self) -> bool:
        return self.healthy and not self.draining


@dataclass
class ClusterSignals:
    queue_length: int  # requests waiting in the master's queue (not yet dispatched)
    instances: list[InstanceSignals]
    decode_queue_length: int = 0  # prefilled requests waiting in the master for a decode instance
    ttft_attainment: float | None = None  # share of recent requests within ttft_slo_s (None: no data)
    tpot_attainment: float | None = None


@dataclass(frozen=True)
class ScalingDecision:
    action: Literal["scale_ep", "add_instance", "remove_instance"]
    role: str
    instance: str | None = None  # scale_ep/remove_instance: which one
    npus: int | None = None  # scale_ep: the new EP size; add_instance: the new instance's EP
    reason: str = ""  # names the signal and threshold

    def as_dict(self) -> dict:
        return asdict(self)


class AutoscalerPolicy:
    def __init__(self, config: AutoscalerConfig, ep_choices: Callable[[int], bool] = lambda n: True):
        self.config = config
        self.ep_choices = ep_choices
        self.history: list[tuple[float, ScalingDecision]] = []

    # -- state ---------------------------------------------------------------------------

    def record(self, decision: ScalingDecision, now: float) -> None:
        """The caller carried `decision` out at `now`: its role cools down from here."""
        self.history.append((now, decision))

    def in_cooldown(self, role: str, now: float) -> bool:
        return any(d.role == role and now - t < self.config.cooldown_s for t, d in self.history)

    # -- EP sizes ------------------------------------------------------------------------

    def _allowed(self, n: int) -> bool:
        return self.config.min_ep <= n <= self.config.max_ep and bool(self.ep_choices(n))

    def grow_ep(self, ep: int) -> int | None:
        """The next allowed EP size above `ep` (double first), or None."""
        if self._allowed(2 * ep):
            return 2 * ep
        for n in range(max(ep + 1, self.config.min_ep), self.config.max_ep + 1):
            if self._allowed(n):
                return n
        return None

    def shrink_ep(self, ep: int) -> int | None:
        """The next allowed EP size below `ep` (halve first), or None."""
        if ep % 2 == 0 and self._allowed(ep // 2):
            return ep // 2
        for n in range(min(ep - 1, self.config.max_ep), self.config.min_ep - 1, -1):
            if self._allowed(n):
                return n
        return None

    def _new_instance_ep(self, active: list[InstanceSignals]) -> int | None:
        counts = Counter(i.ep for i in active)
        ep = max(counts, key=lambda e: (counts[e], e))
        if self._allowed(ep):
            return ep
        lo, hi = self.config.min_ep, self.config.max_ep
        # nearest allowed size within the bounds (ties to the larger)
        candidates = [n for n in range(lo, hi + 1) if self._allowed(n)]
        if not candidates:
            return None
        return min(candidates, key=lambda n: (abs(n - ep), -n))

    # -- deciding ------------------------------------------------------------------------

    def decide(self, signals: ClusterSignals, now: float) -> list[ScalingDecision]:
        """At most one decision per role; no state changes (call record() once carried out)."""
        cfg = self.config
        active: dict[str, list[InstanceSignals]] = {}
        total: Counter[str] = Counter()
        for inst in signals.instances:
            total[inst.role] += 1
            if inst.active:
                active.setdefault(inst.role, []).append(inst)
        if "prefill" in active and "decode" in active:
            dispatch = "prefill"
        elif "mixed" in active:
            dispatch = "mixed"
        else:
            dispatch = None

        ttft_missed = (
            cfg.ttft_slo_s is not None
            and signals.ttft_attainment is not None
            and signals.ttft_attainment < cfg.slo_target
        )
        tpot_missed = (
            cfg.tpot_slo_s is not None
            and signals.tpot_attainment is not None
            and signals.tpot_attainment < cfg.slo_target
        )

        decisions = []
        for role in sorted(active, key=lambda r: (_ROLE_ORDER.get(r, len(_ROLE_ORDER)), r)):
            if self.in_cooldown(role, now):
                log.debug("autoscaler: %s in cool-down", role)
                continue
            insts = sorted(active[role], key=lambda i: i.name)
            queued = ((signals.queue_length if role == dispatch else 0)
                      + (signals.decode_queue_length if role == "decode" else 0) + sum(i.waiting for i in insts))
            pressure = queued / len(insts)
            kv = max(i.kv_usage for i in insts)

            out_reasons = []
            if pressure > cfg.queue_high:
                out_reasons.append(f"{role} queue {pressure:.1f}/instance > queue_high {cfg.queue_high}")
            if kv > cfg.kv_high:
                out_reasons.append(f"{role} kv {kv:.2f} > kv_high {cfg.kv_high}")
            if ttft_missed and role == dispatch:
                out_reasons.append(
                    f"{role} ttft attainment {signals.ttft_attainment:.2f} < slo_target {cfg.slo_target}"
                    f" (ttft_slo_s {cfg.ttft_slo_s})"
                )
            if tpot_missed and role in ("decode", "mixed"):
                out_reasons.append(
                    f"{role} tpot attainment {signals.tpot_attainment:.2f} < slo_target {cfg.slo_target}"
                    f" (tpot_slo_s {cfg.tpot_slo_s})"
                )

            decision = None
            if out_reasons:
                decision = self._scale_out(role, insts, total[role], "; ".join(out_reasons))
            elif pressure <= cfg.queue_low and kv < cfg.kv_low and not (ttft_missed or tpot_missed):
                reason = (
                    f"{role} idle: queue {pressure:.1f}/instance <= queue_low {cfg.queue_low}"
                    f", kv {kv:.2f} < kv_low {cfg.kv_low}"
                )
                if cfg.ttft_slo_s is not None or cfg.tpot_slo_s is not None:
                    reason += ", SLO met"
                decision = self._scale_in(role, insts, reason)
            if decision is not None:
                log.info(
                    "autoscaler: %s %s%s%s: %s",
                    decision.action,
                    role,
                    f" {decision.instance}" if decision.instance else "",
                    f" -> ep {decision.npus}" if decision.npus is not None else "",
                    decision.reason,
                )
                decisions.append(decision)
        return decisions

    def _grow(self, role: str, insts: list[InstanceSignals], reason: str) -> ScalingDecision | None:
        for inst in sorted(insts, key=lambda i: -i.load):  # stable: names break ties
            new = self.grow_ep(inst.ep)
            if new is not None:
                return ScalingDecision("scale_ep", role, inst.name, new, f"{reason}; grow EP {inst.ep} -> {new}")
        return None

    def _add(self, role: str, insts: list[InstanceSignals], count: int, reason: str) -> ScalingDecision | None:
        if count >= self.config.max_instances:
            return None
        ep = self._new_instance_ep(insts)
        if ep is None:
            return None
        return ScalingDecision(
            "add_instance", role, None, ep, f"{reason}; add instance ({count + 1}/{self.config.max_instances})"
        )

    def _scale_out(self, role: str, insts: list[InstanceSignals], count: int, reason: str) -> ScalingDecision | None:
        if self.config.prefer == "vertical":
            return self._grow(role, insts, reason) or self._add(role, insts, count, reason)
        return self._add(role, insts, count, reason) or self._grow(role, insts, reason)

    def _scale_in(self, role: str, insts: list[InstanceSignals], reason: str) -> ScalingDecision | None:
        if len(insts) > 1 and len(insts) > self.config.min_instances:
            victim = min(insts, key=lambda i: (i.load, i.kv_usage))  # stable: names break ties
            return ScalingDecision(
                "remove_instance", role, victim.name, None, f"{reason}; remove least loaded instance"
            )
        for inst in sorted(insts, key=lambda i: (-i.ep, i.load)):
            new = self.shrink_ep(inst.ep)
            if new is not None:
                return ScalingDecision("scale_ep", role, inst.name, new, f"{reason}; shrink EP {inst.ep} -> {new}")
        return None
