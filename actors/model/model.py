"""MoEModel: embedding -> decoder layers (attention + dense FFN or MoE) -> norm -> LM head.

The same module runs in the single-process reference (every expert local) and
on an NPU actor of an EP instance (only its experts, the others reached through
an ExpertExecutor), so the two can only differ where the experts run.
"""

from __future__ import annotations

from typing import Mapping, Iterable

import torch
from torch import nn

from actors.model.batch import ForwardBatch
from actors.model.config import ModelConfig
from actors.model.decoder_layer import DecoderLayer
from actors.model.layers import RMSNorm
from actors.model.moe import ExpertExecutor, MoELayer
from actors.model.mtp import MTPModule

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MoEModel(nn.Module):
    def __init__(self, cfg: ModelConfig, held_experts: Mapping[int, Iterable[int]] | None = None):
        """held_experts: MoE layer -> logical experts this process holds (None: all)."""
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, None if held_experts is None else held_experts.get(i, ())) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # multi-token prediction heads (actors/model/mtp.py); absent when num_mtp_layers == 0
        self.mtp: nn.ModuleList | None = None
        if cfg.num_mtp_layers > 0:
            self.mtp = nn.ModuleList(MTPModule(cfg, j) for j in range(cfg.num_mtp_layers))

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.cfg.dtype]

    def forward(self, batch: ForwardBatch, cache, executor: ExpertExecutor) -> torch.Tensor:
        """Final hidden states of every row [T, hidden]."""
        return self.norm(self.residual(batch, cache, executor))

    def residual(self, batch: ForwardBatch, cache, executor: ExpertExecutor) -> torch.Tensor:
        """The residual stream after the last layer, before the final norm (what MTP reads)."""
        x = self.embed_tokens(batch.input_ids)
        for layer in self.layers:
            x = layer(x, batch, cache, executor)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = torch.matmul(hidden, weight.t())
        return logits if logits.dtype == torch.float64 else logits.float()

    def mtp_forward(self, depth: int, hidden: torch.Tensor, batch: ForwardBatch, cache, executor: ExpertExecutor) -> torch.Tensor:
        """MTP module `depth` on rows at positions i (batch.positions): hidden [T, h]
        is the previous depth's pre-norm output at i (depth 0: the main model's),
        batch.input_ids the token that depth predicts there, t_{i+1+depth}.
        Returns this depth's pre-norm hidden [T, h]; `self.logits(self.norm(.))`
        of a row predicts t_{i+2+depth}."""
        if self.mtp is None:
            raise ValueError("model has no MTP modules (cfg.num_mtp_layers == 0)")
        return self.mtp[depth](hidden, self.embed_tokens(batch.input_ids), batch, cache, executor)

    def moe_layers(self) -> list[MoELayer]:
        return [layer.mlp for layer in self.layers if layer.is_moe]
