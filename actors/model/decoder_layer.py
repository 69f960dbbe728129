"""DecoderLayer: attention then a dense FFN or MoE, each after an RMSNorm and
around a residual: a layer of the main model and the core of an MTP module."""

from __future__ import annotations

from typing import Iterable

from torch import nn

from actors.model.attention import build_attention
from actors.model.config import ModelConfig
from actors.model.layers import RMSNorm, SwiGLU
from actors.model.moe import MoELayer


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, held_experts: Iterable[int] | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.mlp = MoELayer(cfg, layer, held_experts) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, batch, cache, executor):
        x = x + self.self_attn(self.input_layernorm(x), batch, cache)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, executor) if self.is_moe else self.mlp(h))
