"""Emulated routing: how an emulated model's tokens spread over its experts.

Emulated NPUs route no tokens, yet top-k routing makes some experts hot, and a
MoE layer costs what its most loaded die costs; Omni Placement exists to cure
that. So each MoE layer gets a seeded popularity over its experts: log-normal,
p_e proportional to exp(skew * z_e) with z_e ~ N(0, 1) drawn from the model's
seed and the layer (skew 0: uniform). Under MoGE every token takes one expert per
group, so popularity is normalised within each group: a group carries 1/groups
of the pairs whatever the skew, and a device that holds whole groups is balanced
by construction. The pairs that land on a rank are the layer's pairs times the
popularity of the experts it holds, each split evenly among its copies (as
actors.ep splits a replicated expert's pairs).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from actors.expert_map import ExpertMap
from actors.model.config import ModelConfig


@lru_cache(maxsize=256)
def popularity(cfg: ModelConfig, layer: int, skew: float) -> np.ndarray:
    """The share of a layer's (token, expert) pairs each expert takes; sums to 1."""
    e = cfg.num_experts
    if skew <= 0:
        return np.full(e, 1.0 / e)
    z = np.random.default_rng([cfg.seed, layer, 7919]).standard_normal(e)
    w = np.exp(skew * z)
    groups = cfg.num_expert_groups if cfg.router == "moge" else 1
    w = w.reshape(groups, -1)
    return (w / w.sum(axis=1, keepdims=True) / groups).reshape(-1)


def rank_loads(cfg: ModelConfig, expert_map: ExpertMap, skew: float) -> np.ndarray:
    """[MoE layers, ranks]: each rank's routed load over the mean rank's (1.0: balanced)."""
    ranks = expert_map.ep_size
    out = np.empty((len(cfg.moe_layers), ranks))
    for i, layer in enumerate(cfg.moe_layers):
        held = expert_map.slots[layer]
        p = popularity(cfg, layer, skew)
        copies = np.zeros(cfg.num_experts)
        for experts in held:
            copies[experts] += 1
        for r, experts in enumerate(held):
            out[i, r] = (p[experts] / copies[experts]).sum() * ranks
    return out


def straggler_loads(cfg: ModelConfig, expert_map: ExpertMap, skew: float) -> list[float]:
    """Per MoE layer, the most loaded rank's load: every rank waits for it at the
    layer's combine, so it sets the layer's time on all of them."""
    return rank_loads(cfg, expert_map, skew).max(axis=1).tolist()


def pairs_routed(cfg: ModelConfig, layer: int, tokens: int, skew: float) -> np.ndarray:
    """The pairs `tokens` tokens route to each expert of `layer`, in expectation."""
    return tokens * cfg.num_experts_per_tok * popularity(cfg, layer, skew)
