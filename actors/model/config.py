"""ModelConfig: the shapes of one MoE decoder model, validated on load.

One config describes a tiny test model (real compute) and a 718B-class model
(emulated compute) alike; `parameter_counts()` is the single place that says
how many parameters each part holds, so the HBM ledger of an emulated NPU is
charged exactly what the real weights of the same shapes would take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


class ModelConfig(BaseModel):
    """Shapes and switches of a decoder-only MoE model (DeepSeek / Pangu style)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "tiny-moe"
    vocab_size: int = Field(512, gt=0)
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    max_position_embeddings: int = Field(2048, gt=0)
    rms_norm_eps: float = Field(1e-6, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    tie_word_embeddings: bool = False

    # attention
    attention: Literal["gqa", "mla"] = "gqa"
    attention_kernel: Literal["softmax", "amla"] = "softmax"
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    head_dim: int = Field(16, gt=0)
    # MLA (DeepSeek-V2/V3, Pangu Ultra): low-rank compressed KV
    q_lora_rank: int | None = Field(None, gt=0)
    kv_lora_rank: int = Field(32, gt=0)
    qk_nope_head_dim: int = Field(16, gt=0)
    qk_rope_head_dim: int = Field(8, gt=0)
    v_head_dim: int = Field(16, gt=0)

    # feed-forward
    first_k_dense_layers: int = Field(0, ge=0)
    intermediate_size: int = Field(128, gt=0)  # dense layers' FFN
    moe_intermediate_size: int = Field(32, gt=0)  # one routed expert's FFN
    num_experts: int = Field(8, gt=0)
    num_experts_per_tok: int = Field(2, gt=0)
    num_shared_experts: int = Field(1, ge=0)
    router: Literal["topk", "moge"] = "topk"
    num_expert_groups: int = Field(1, gt=0)  # MoGE: G equal groups
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True

    # multi-token prediction heads (speculative decoding)
    num_mtp_layers: int = Field(0, ge=0)

    # numerics: dtype of real compute, and of the weights an emulated NPU is charged for
    # float64 is for verification: at 1e-16 rounding, batch composition cannot
    # flip a near-tied routing decision, so EP and reference logits agree to 1e-9.
    dtype: Literal["float64", "float32", "bfloat16", "float16"] = "float32"
    weight_dtype: Literal["float64", "float32", "bfloat16", "float16", "int8"] = "float32"
    kv_dtype: Literal["float64", "float32", "bfloat16", "float16", "int8"] = "float32"
    init_std: float = Field(0.08, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.attention == "gqa" and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})"
            )
        if self.router == "moge":
            g = self.num_expert_groups
            if self.num_experts % g:
                raise ValueError(f"num_experts ({self.num_experts}) must split into num_expert_groups ({g}) equal groups")
            if self.num_experts_per_tok % g:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be a multiple of num_expert_groups ({g}) for MoGE"
                )
        if self.attention == "mla" and self.qk_rope_head_dim % 2:
            raise ValueError("qk_rope_head_dim must be even (RoPE rotates pairs)")
        if self.attention == "gqa" and self.head_dim % 2:
            raise ValueError("head_dim must be even (RoPE rotates pairs)")
        if self.first_k_dense_layers > self.num_layers:
            raise ValueError("first_k_dense_layers exceeds num_layers")
        return self

    # ---- derived shapes -------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_layers

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    @property
    def qk_head_dim(self) -> int:
        """Width of one query head's dot product with a key."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    def kv_elements_per_token(self) -> int:
        """Elements one token stores in the KV cache of one layer.

        MLA caches the compressed latent and the shared RoPE key only; that is
        its point (DeepSeek-V2 §2.1)."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token takes across all layers, MTP layers included."""
        return self.kv_elements_per_token() * (self.num_layers + self.num_mtp_layers) * DTYPE_BYTES[self.kv_dtype]

    def attention_params(self) -> int:
        h = self.hidden_size
        if self.attention == "mla":
            q = (
                h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.num_heads * self.qk_head_dim
                if self.q_lora_rank
                else h * self.num_heads * self.qk_head_dim
            )
            kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv_b = self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
            o = self.num_heads * self.v_head_dim * h
            return q + kv_a + kv_b + o
        q = h * self.num_heads * self.head_dim
        kv = 2 * h * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * h
        return q + kv + o

    def expert_params(self) -> int:
        """One routed expert: gate, up and down projections (SwiGLU)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def mtp_expert_params(self) -> int:
        """The routed experts of the MTP layers (part of `parameter_counts().mtp`)."""
        return self.num_mtp_layers * self.num_experts * self.expert_params()

    def parameter_counts(self) -> "ParameterCounts":
        """Parameters by part; the ledger and the weight loader both use this."""
        h = self.hidden_size
        embed = self.vocab_size * h
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * h
        norms = 2 * h  # two RMSNorms a layer
        per_layer_attn = self.attention_params() + norms
        dense_ffn = 3 * h * self.intermediate_size
        shared = self.num_shared_experts * self.expert_params()
        router = self.num_experts * h
        n_moe = len(self.moe_layers)
        n_dense = self.num_layers - n_moe
        # an MTP module: enorm + hnorm + projection 2h->h + one decoder layer (MoE)
        mtp_layer = 2 * h + 2 * h * h + per_layer_attn + shared + router + self.num_experts * self.expert_params()
        return ParameterCounts(
            embedding=embed,
            lm_head=lm_head,
            final_norm=h,
            attention=self.num_layers * per_layer_attn,
            dense_ffn=n_dense * dense_ffn,
            shared_experts=n_moe * shared,
            routers=n_moe * router,
            routed_experts=n_moe * self.num_experts * self.expert_params(),
            mtp=self.num_mtp_layers * mtp_layer,
        )


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts by part. `routed_experts` is what EP shards; the rest is
    replicated on every NPU of an instance (attention runs data-parallel)."""

    embedding: int
    lm_head: int
    final_norm: int
    attention: int
    dense_ffn: int
    shared_experts: int
    routers: int
    routed_experts: int
    mtp: int

    @property
    def replicated(self) -> int:
        return (
            self.embedding + self.lm_head + self.final_norm + self.attention + self.dense_ffn
            + self.shared_experts + self.routers + self.mtp
        )

    @property
    def total(self) -> int:
        return self.replicated + self.routed_experts
