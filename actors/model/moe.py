"""The MoE feed-forward layer and where its experts run.

MoELayer = router + shared expert(s) + routed experts. Which routed experts a
process holds, and how tokens reach them, is the ExpertExecutor's business:
`LocalExperts` runs every expert in this process (the single-process
reference); `actors.ep.EPExperts` sends tokens to their experts' NPUs by
all-to-all and back. Both return, for every token-expert pair (t, j), the
expert's output on token t, and the layer combines them the same way.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch
from torch import nn

from actors.model.config import ModelConfig
from actors.model.layers import SwiGLU
from actors.model.router import RouterOutput, build_router, expert_load


class ExpertExecutor(Protocol):
    def run(self, moe: "MoELayer", x: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        """Expert outputs per token-expert pair: [T, k, hidden]."""
        ...


def apply_grouped(experts: nn.ModuleDict, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Run each row of x through the expert named by expert_ids (one id a row),
    grouping rows by expert so each expert does one matmul."""
    out = torch.empty_like(x)
    if x.shape[0] == 0:
        return out
    for e in torch.unique(expert_ids).tolist():
        rows = (expert_ids == e).nonzero(as_tuple=True)[0]
        out[rows] = experts[str(e)](x[rows])
    return out


class LocalExperts:
    """All routed experts in this process."""

    comm_s = 0.0  # no collective (EPExperts counts its all-to-alls)
    max_rows: int | None = None  # (EPExperts: bounds a step's dispatch)

    def run(self, moe: "MoELayer", x: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        t, k = route.expert_ids.shape
        rows = x.repeat_interleave(k, dim=0)
        return apply_grouped(moe.experts, rows, route.expert_ids.reshape(-1)).view(t, k, -1)


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, held_experts: Iterable[int] | None = None):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.gate = build_router(cfg)
        held = range(cfg.num_experts) if held_experts is None else sorted(set(held_experts))
        self.experts = nn.ModuleDict({str(e): SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size) for e in held})
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.num_shared_experts * cfg.moe_intermediate_size)
            if cfg.num_shared_experts
            else None
        )
        # token-expert pairs routed per logical expert since the last reset
        self.register_buffer("load", torch.zeros(cfg.num_experts, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, executor: ExpertExecutor) -> torch.Tensor:
        route = self.gate(x)
        self.load += expert_load(route.expert_ids, self.cfg.num_experts)
        per_pair = executor.run(self, x, route)  # [T, k, H]
        out = (per_pair * route.weights.unsqueeze(-1)).sum(dim=1)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
