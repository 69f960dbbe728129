"""Multi-token prediction (DeepSeek-V3 §2.2): one extra decoder depth per MTP module.

MTP module j turns, for every position i, the previous depth's hidden state h_i
and the embedding of the *next* token t_{i+1} into a prediction of t_{i+2}:

    x_i   = eh_proj(cat(hnorm(h_i), enorm(Emb(t_{i+1}))))      2h -> h, no bias
    h'_i  = DecoderLayer_{num_layers + j}(x_i)                 attention + MoE
    p_i   = LMHead(norm(h'_i))                                  -> t_{i+2}

Choices, and why:
- h_i of depth 0 is the main model's last hidden state BEFORE its final norm
  (the residual stream, as DeepSeek's "output of the previous depth"); hnorm
  normalises it, so applying the final norm first would only fold that norm's
  weight into hnorm's. Depth j >= 1 (or a chained single module) likewise gets
  the previous MTP module's pre-norm output h'_i.
- Embedding, final norm and LM head are the main model's (shared, as in the
  paper): `parameter_counts().mtp` counts only enorm + hnorm + eh_proj + one
  MoE decoder layer. (DeepSeek-V3's released checkpoint also carries a
  per-module `shared_head.norm`; this model reuses the main norm instead.)
- The decoder layer gets layer index num_layers + j, so its attention appends
  to its own KV-cache entry and never to one of the main model's layers.
- Its MoE layer always holds all experts (not EP-sharded); parameter_counts()
  likewise counts `mtp` as replicated.

Row layout of an MTP forward: a ForwardBatch whose input_ids are the tokens
t_{i+1} and whose positions are i (the position of h_i), so the MTP layer's
cache for a sequence covers positions 0..i exactly like a main layer's would.
"""

from __future__ import annotations

import torch
from torch import nn

from actors.model.config import ModelConfig
from actors.model.layers import RMSNorm
from actors.model.decoder_layer import DecoderLayer


class MTPModule(nn.Module):
    """One MTP depth: enorm, hnorm, eh_proj and one MoE decoder layer."""

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        h = cfg.hidden_size
        self.depth = depth
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.layer = DecoderLayer(cfg, cfg.num_layers + depth, None)
        assert self.layer.is_moe, "an MTP depth is a MoE layer (parameter_counts assumes so)"

    def forward(self, hidden: torch.Tensor, next_emb: torch.Tensor, batch, cache, executor) -> torch.Tensor:
        """hidden [T, h] (previous depth, pre-norm), next_emb [T, h] = Emb(t_{i+1})
        -> this depth's pre-norm hidden [T, h]."""
        x = self.eh_proj(torch.cat([self.hnorm(hidden), self.enorm(next_emb)], dim=-1))
        return self.layer(x, batch, cache, executor)
