"""Routing policies: which instance a request goes to.

Five policies, one small class each, so experiments can A/B them by name
(``make_policy``): ``round_robin`` and ``least_loaded`` (baselines),
``cache_aware`` (the SGLang router's rule: prefix affinity unless the load is
out of balance), ``omni_reference`` (the original Omni Proxy's rule) and
``omni``.

What a policy sees of an instance (``InstanceView``) is the master's own
account, exact at decision time: ``queued_tokens`` are the uncached prompt
tokens dispatched there and not yet prefilled (released when the prefill is
done), ``running`` counts each request the master has there once, from
dispatch to finish, and ``cached`` is the instance's prefix-block index, kept
exact by the KV events its engine emits every step (cluster.proxy.prefix_index).
The master passes only candidates under their budgets (cluster.proxy.budgets).

``omni_reference``, as the original schedules prefill (omni_proxy's
omni_scheduler.c / omni_apc.c): the deepest prefix match, then fewest queued
tokens, then fewest running; when nothing matches anywhere, fewest queued
tokens, scanning round robin from the last choice. The cached prefix always
wins, however long the queue behind it. ``omni`` trades the two in one
formula, every term in tokens of prefill work:

    score = (1 + kappa * congestion) * cached_tokens
            - alpha * queued_tokens - beta * running * block_size

    cached_tokens = match_depth * block_size   prefix KV the instance holds, not recomputed
                  + gamma * max(0, global_depth - match_depth) * block_size
                                               further prefix blocks in the global KV cache:
                                               loaded, not recomputed, but the load costs
    gamma (0.5)   a block loaded from the object store counts half a held one
    alpha (1.0)   one queued token ahead of us costs one token of prefill
    beta  (0.5)   each running sequence slows every step of the batch we join by
                  about half a block of prefill (a stand-in for predicted batch time)
    congestion    requests waiting in the master's prefill queue per candidate
    kappa (1.0)   every token a request recomputes is capacity that each of them
                  waits for: the busier the cluster, the more a cached token is
                  worth (idle, the score is the request's own predicted TTFT)

Unlike the others, ``omni`` is given every healthy instance, those at their
budgets too (their queued tokens and running requests count against them), and
a request whose best instance is full waits in the master's queue for it while
requests behind it may go elsewhere (``waits_for_choice``; ``omni_waits: false``
switches it off): under load, taking whichever instance frees up first would
scatter every conversation. A starved request takes the best instance with room. Candidates with fewer free KV blocks
than ``ceil((prompt_tokens + max_tokens) / block_size)`` are skipped unless none
qualify. Highest score wins; ties go to fewer queued tokens, then name.

Decode (P/D): every policy picks the decode instance with the fewest decode
tokens (prompt + max_tokens of the requests decoding there), then fewest
running, then name: the original's rule (fewest tokens among the instances
under ``decode_max_num_seqs``; it computes a decode match depth but never uses
it, and so does OmniRay: a decode instance loads the whole prompt's KV anyway).

Every constant is a field of ``RoutingConfig`` (manifest ``proxy:`` settings).
Policies only choose: the caller passes candidates that are non-empty, healthy,
of the right role and under their budgets.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import Protocol

from cluster.proxy.prefix_index import prefix_depth
from cluster.proxy.sorting import QueuedRequest


@dataclass(frozen=True)
class RoutingConfig:
    """Every constant of every policy (the manifest's ``proxy:`` settings of the same names)."""

    omni_alpha: float = 1.0  # omni: weight of a queued token against a cached one
    omni_beta: float = 0.5  # omni: blocks of prefill one running sequence costs
    omni_gamma: float = 0.5  # omni: worth of a global-cache block against a held one
    omni_kappa: float = 1.0  # omni: how much a cached token is worth more per request waiting per instance
    omni_waits: bool = True  # omni: a request may wait for a full instance that holds more of its prefix
    cache_threshold: float = 0.5  # cache_aware: least match ratio that earns affinity
    balance_abs_threshold: float = 32  # cache_aware: load gap (tokens) that may be imbalance...
    balance_rel_threshold: float = 1.5  # ...if the busiest also has this times the idlest's load


@dataclass
class InstanceView:
    """The master's view of one instance at decision time."""

    name: str
    role: str  # "mixed" | "prefill" | "decode"
    running: int = 0  # requests the master has there, each counted once (dispatch to finish)
    queued_tokens: int = 0  # uncached prompt tokens dispatched there and not yet prefilled
    decode_tokens: int = 0  # prompt + max_tokens of the requests decoding there
    free_blocks: int = 0
    total_blocks: int = 1
    healthy: bool = True
    cached: frozenset[int] | set | Collection[int] = frozenset()  # block hashes cached there (its KV events)

    def match_depth(self, hashes: list[int]) -> int:
        """Length of the longest prefix of ``hashes`` all in ``cached`` (a chain: a miss ends it)."""
        return prefix_depth(hashes, self.cached)

    @property
    def load(self) -> int:
        """queued_tokens + running: token backlog plus one per running sequence.

        Used by ``cache_aware`` for its balance test (tokens dominate; ``running``
        separates instances with equal backlogs).
        """
        return self.queued_tokens + self.running


class RoutingPolicy(Protocol):
    name: str
    # True: `choose` is given every healthy instance, also those at their budgets, and
    # the request waits for its choice; False: only those under their budgets
    waits_for_choice: bool

    def choose(self, req: QueuedRequest, candidates: list[InstanceView], block_size: int,
               waiting: int = 0) -> InstanceView:
        """The prefill (or mixed) instance for ``req`` among ``candidates``;
        ``waiting``: requests in the master's prefill queue (the congestion)."""

    def choose_decode(self, req: QueuedRequest, candidates: list[InstanceView]) -> InstanceView:
        """The decode instance for a prefilled ``req`` (P/D) among ``candidates``."""


def _least_loaded_key(v: InstanceView) -> tuple[int, int, str]:
    return (v.queued_tokens, v.running, v.name)


class _DecodeByTokens:
    """The decode choice every policy shares (the module docstring)."""

    waits_for_choice = False

    def choose_decode(self, req: QueuedRequest, candidates: list[InstanceView]) -> InstanceView:
        return min(candidates, key=lambda v: (v.decode_tokens, v.running, v.name))


class _RoundRobinCursor:
    """The next candidate in name order after the last one picked, wrapping;
    robust to candidates coming and going."""

    def __init__(self):
        self.last: str | None = None

    def rotation(self, candidates: list[InstanceView]) -> list[InstanceView]:
        ordered = sorted(candidates, key=lambda v: v.name)
        start = next((i for i, v in enumerate(ordered) if self.last is not None and v.name > self.last), 0)
        return ordered[start:] + ordered[:start]

    def took(self, pick: InstanceView) -> InstanceView:
        self.last = pick.name
        return pick


class RoundRobin(_DecodeByTokens):
    """Cycles through the candidates in name order, whatever their load or cache."""

    name = "round_robin"

    def __init__(self, config: RoutingConfig | None = None):
        self.cursor = _RoundRobinCursor()

    def choose(self, req: QueuedRequest, candidates: list[InstanceView], block_size: int,
               waiting: int = 0) -> InstanceView:
        return self.cursor.took(self.cursor.rotation(candidates)[0])


class LeastLoaded(_DecodeByTokens):
    """Fewest queued tokens, then fewest running, then name."""

    name = "least_loaded"

    def __init__(self, config: RoutingConfig | None = None):
        pass

    def choose(self, req: QueuedRequest, candidates: list[InstanceView], block_size: int,
               waiting: int = 0) -> InstanceView:
        return min(candidates, key=_least_loaded_key)


class CacheAware(_DecodeByTokens):
    """SGLang-router style: prefix affinity while the load is balanced.

    Imbalanced when ``max_load - min_load > balance_abs_threshold`` and
    ``max_load > balance_rel_threshold * min_load`` (``load`` = queued tokens +
    running): then least loaded. Otherwise the deepest prefix match if its match
    ratio ``depth / len(hashes)`` is at least ``cache_threshold``, else least loaded.
    """

    name = "cache_aware"

    def __init__(self, config: RoutingConfig | None = None):
        c = config or RoutingConfig()
        self.cache_threshold = c.cache_threshold
        self.balance_abs_threshold = c.balance_abs_threshold
        self.balance_rel_threshold = c.balance_rel_threshold

    def imbalanced(self, candidates: list[InstanceView]) -> bool:
        hi, lo = max(v.load for v in candidates), min(v.load for v in candidates)
        return hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo

    def choose(self, req: QueuedRequest, candidates: list[InstanceView], block_size: int,
               waiting: int = 0) -> InstanceView:
        least = min(candidates, key=_least_loaded_key)
        if self.imbalanced(candidates) or not req.block_hashes:
            return least
        best = min(candidates, key=lambda v: (-v.match_depth(req.block_hashes), *_least_loaded_key(v)))
        ratio = best.match_depth(req.block_hashes) / len(req.block_hashes)
        return best if ratio >= self.cache_threshold else least


class OmniReference(_DecodeByTokens):
    """The original Omni Proxy's prefill rule (see the module docstring)."""

    name = "omni_reference"

    def __init__(self, config: RoutingConfig | None = None):
        self.cursor = _RoundRobinCursor()

    def choose(self, req: QueuedRequest, candidates: list[InstanceView], block_size: int,
               waiting: int = 0) -> InstanceView:
        depth = {v.name: v.match_depth(req.block_hashes) for v in candidates}
        if max(depth.values()) > 0:
            return self.cursor.took(min(candidates, key=lambda v: (-depth[v.name], *_least_loaded_key(v))))
        # min keeps the first of equals: the first in the rotation from the last choice
        return self.cursor.took(min(self.cursor.rotation(candidates), key=lambda v: v.queued_tokens))


class Omni(_DecodeByTokens):
    """One formula weighing cached prefix against queued work (see the module docstring)."""

    name = "omni"

    def __init__(self, config: RoutingConfig | None = None):
        c = config or RoutingConfig()
        self.alpha, self.beta, self.gamma = c.omni_alpha, c.omni_beta, c.omni_gamma
        self.kappa = c.omni_kappa
        self.waits_for_choice = c.omni_waits

    @staticmethod
    def blocks_needed(req: QueuedRequest, block_size: int) -> int:
        return math.ceil((req.prompt_tokens + req.max_tokens) / block_size)

    def score(self, req: QueuedRequest, v: InstanceView, block_size: int, congestion: float = 0.0) -> float:
        """(1 + kappa * congestion) * cached_tokens - alpha * queued_tokens - beta * running * block_size."""
        depth = v.match_depth(req.block_hashes)
        cached_tokens = (depth + self.gamma * max(0, req.global_depth - depth)) * block_size
        return ((1 + self.kappa * congestion) * cached_tokens - self.alpha * v.queued_tokens
                - self.beta * v.running * block_size)

    def choose(self, req: QueuedRequest, candidates: list[InstanceView], block_size: int,
               waiting: int = 0) -> InstanceView:
        need = self.blocks_needed(req, block_size)
        room = [v for v in candidates if v.free_blocks >= need] or candidates
        congestion = waiting / len(candidates)
        return min(room, key=lambda v: (-self.score(req, v, block_size, congestion), v.queued_tokens, v.name))


POLICIES: dict[str, type] = {p.name: p for p in (RoundRobin, LeastLoaded, CacheAware, OmniReference, Omni)}


def make_policy(name: str, config: RoutingConfig | None = None) -> RoutingPolicy:
    """A policy by its name, with the constants of ``config`` (default: RoutingConfig())."""
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name](config)


def routing_config(settings) -> RoutingConfig:
    """The RoutingConfig of an object with fields of the same names (the manifest's ProxySettings)."""
    return RoutingConfig(**{f.name: getattr(settings, f.name) for f in fields(RoutingConfig)})
