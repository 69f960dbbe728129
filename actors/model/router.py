"""Routers: plain top-k and MoGE (Mixture of Grouped Experts, Pangu Pro MoE).

Both score experts with a softmax over the router logits. Top-k picks the k
best experts of all; MoGE splits the experts into G equal groups (one group per
device) and picks the k/G best inside every group, so every device receives
exactly the same number of token-expert pairs: its imbalance score is 0 by
construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from actors.expert_map import imbalance_score  # noqa: F401  (re-exported: the imbalance of group loads)
from actors.model.config import ModelConfig


@dataclass
class RouterOutput:
    expert_ids: torch.Tensor  # [T, k] int64, logical expert ids
    weights: torch.Tensor  # [T, k] combine weights


def expert_load(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Token-expert pairs per expert [E]."""
    return torch.bincount(expert_ids.reshape(-1), minlength=num_experts)


def group_load(load: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Load per group of E/G consecutive experts [G] (a group = one device's experts)."""
    return load.view(num_groups, -1).sum(dim=1)


class Router(nn.Module):
    """Shared scoring; subclasses choose the experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> RouterOutput:
        # at least float32 (bf16 routing is too coarse), float64 kept for verification
        logits = torch.matmul(x, self.weight.t())
        scores = torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
        weights, ids = self.select(scores)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return RouterOutput(ids, (weights * self.cfg.routed_scaling_factor).to(x.dtype))

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TopKRouter(Router):
    def select(self, scores):
        return torch.topk(scores, self.cfg.num_experts_per_tok, dim=-1)


class MoGERouter(Router):
    def select(self, scores):
        g = self.cfg.num_expert_groups
        per_group = self.cfg.num_experts_per_tok // g
        group_size = self.cfg.num_experts // g
        grouped = scores.view(scores.shape[0], g, group_size)
        weights, local = torch.topk(grouped, per_group, dim=-1)  # [T, G, k/G]
        offsets = (torch.arange(g) * group_size).view(1, g, 1)
        k = self.cfg.num_experts_per_tok
        return weights.reshape(scores.shape[0], k), (local + offsets).reshape(scores.shape[0], k)


def build_router(cfg: ModelConfig) -> Router:
    return MoGERouter(cfg) if cfg.router == "moge" else TopKRouter(cfg)
