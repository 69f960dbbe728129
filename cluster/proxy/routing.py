"""Routing policies: which instance a request goes to.

Four policies, one small class each, so experiments can A/B them by name
(``make_policy``): ``round_robin`` and ``least_loaded`` (baselines),
``cache_aware`` (the SGLang router's rule: prefix affinity unless the load is
out of balance) and ``omni``.

The original Omni Proxy picks a prefill instance by the deepest prefix match,
then fewest queued tokens, then fewest running: the cached prefix always wins,
however long the queue behind it. It has no formula trading the two. ``Omni``
is that formula, with every term in tokens of prefill work:

    score = cached_tokens - alpha * queued_tokens - beta * running * block_size

    cached_tokens = match_depth * block_size   prefix KV the instance holds, not recomputed
                  + gamma * max(0, global_depth - match_depth) * block_size
                                               further prefix blocks in the global KV cache:
                                               loaded, not recomputed, but the load costs
    gamma   (0.5) a block loaded from the object store counts half a held one
    alpha (1.0)   one queued token ahead of us costs one token of prefill
    beta  (0.5)   each running sequence slows every step of the batch we join by
                  about half a block of prefill (a stand-in for predicted batch time)

Candidates that cannot take the request now (``running >= max_num_seqs``, or
fewer free KV blocks than ``ceil((prompt_tokens + max_tokens) / block_size)``)
are skipped unless none qualify. Highest score wins; ties go to fewer queued
tokens, then name. For decode, ``Omni.choose_decode`` picks the instance with
fewest running sequences among those under ``max_num_seqs``, then most free
blocks (the original: fewest tokens under ``decode_max_num_seqs``).

Policies only choose: the caller passes candidates that are non-empty, healthy
and of the right role.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from cluster.proxy.sorting import QueuedRequest


def prefix_depth(hashes: list[int], cached: Collection[int]) -> int:
    """Leading hashes all present in ``cached``: a prefix chain, so the first miss ends it."""
    depth = 0
    for h in hashes:
        if h not in cached:
            break
        depth += 1
    return depth


@dataclass
class InstanceView:
    """The master's view of one instance at decision time."""

    name: str
    role: str  # "mixed" | "prefill" | "decode"
    running: int = 0
    waiting: int = 0
    queued_tokens: int = 0  # tokens dispatched there and not yet finished
    free_blocks: int = 0
    total_blocks: int = 1
    max_num_seqs: int = 32
    healthy: bool = True
    cached: frozenset[int] | set | Collection[int] = frozenset()  # block hashes believed cached there

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

    def choose(self, req: QueuedRequest, candidates: list[InstanceView], block_size: int) -> InstanceView: ...


def _least_loaded_key(v: InstanceView) -> tuple[int, int, str]:
    return (v.queued_tokens, v.running, v.name)


class RoundRobin:
    """Cycles through the candidates in name order, whatever their load or cache."""

    name = "round_robin"

    def __init__(self):
        self.last: str | None = None

    def choose(self, req: QueuedRequest, candidates: list[InstanceView], block_size: int) -> InstanceView:
        ordered = sorted(candidates, key=lambda v: v.name)
        # the next name after the last choice, wrapping; robust to candidates coming and going
        pick = next((v for v in ordered if self.last is not None and v.name > self.last), ordered[0])
        self.last = pick.name
        return pick


class LeastLoaded:
    """Fewest queued tokens, then fewest running, then name."""

    name = "least_loaded"

    def choose(self, req: QueuedRequest, candidates: list[InstanceView], block_size: int) -> InstanceView:
        return min(candidates, key=_least_loaded_key)


class CacheAware:
    """SGLang-router style: prefix affinity while the load is balanced.

    Imbalanced when ``max_load - min_load > balance_abs_threshold`` and
    ``max_load > balance_rel_threshold * min_load`` (``load`` = queued tokens +
    running): then least loaded. Otherwise the deepest prefix match if its match
    ratio ``depth / len(hashes)`` is at least ``cache_threshold``, else least loaded.
    """

    name = "cache_aware"

    def __init__(self, cache_threshold: float = 0.5, balance_abs_threshold: float = 32,
                 balance_rel_threshold: float = 1.5):
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def imbalanced(self, candidates: list[InstanceView]) -> bool:
        hi, lo = max(v.load for v in candidates), min(v.load for v in candidates)
        return hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo

    def choose(self, req: QueuedRequest, candidates: list[InstanceView], block_size: int) -> InstanceView:
        least = min(candidates, key=_least_loaded_key)
        if self.imbalanced(candidates) or not req.block_hashes:
            return least
        best = min(candidates, key=lambda v: (-v.match_depth(req.block_hashes), *_least_loaded_key(v)))
        ratio = best.match_depth(req.block_hashes) / len(req.block_hashes)
        return best if ratio >= self.cache_threshold else least


class Omni:
    """One formula weighing cached prefix against queued work (see the module docstring)."""

    name = "omni"

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, gamma: float = 0.5):
        self.alpha, self.beta, self.gamma = alpha, beta, gamma

    @staticmethod
    def blocks_needed(req: QueuedRequest, block_size: int) -> int:
        return math.ceil((req.prompt_tokens + req.max_tokens) / block_size)

    def score(self, req: QueuedRequest, v: InstanceView, block_size: int) -> float:
        """cached_tokens - alpha * queued_tokens - beta * running * block_size."""
        depth = v.match_depth(req.block_hashes)
        cached_tokens = (depth + self.gamma * max(0, req.global_depth - depth)) * block_size
        return cached_tokens - self.alpha * v.queued_tokens - self.beta * v.running * block_size

    def choose(self, req: QueuedRequest, candidates: list[InstanceView], block_size: int) -> InstanceView:
        need = self.blocks_needed(req, block_size)
        room = [v for v in candidates if v.running < v.max_num_seqs and v.free_blocks >= need] or candidates
        return min(room, key=lambda v: (-self.score(req, v, block_size), v.queued_tokens, v.name))

    def choose_decode(self, req: QueuedRequest, candidates: list[InstanceView]) -> InstanceView:
        """Fewest running among those under max_num_seqs (else all), then most free blocks, then name."""
        room = [v for v in candidates if v.running < v.max_num_seqs] or candidates
        return min(room, key=lambda v: (v.running, -v.free_blocks, v.name))


POLICIES: dict[str, type] = {p.name: p for p in (RoundRobin, LeastLoaded, CacheAware, Omni)}


def make_policy(name: str, **kwargs) -> RoutingPolicy:
    """A policy by its name; keyword arguments go to its constructor."""
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**kwargs)
