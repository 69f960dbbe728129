"""Attention: GQA and MLA modules, and two kernels — plain softmax and AMLA.

Data flow of one layer: token rows [T, hidden] -> projections for all rows at
once -> per sequence: RoPE at absolute positions, append the new K/V to that
sequence's cache, attend causally over the cache -> output rows [T, hidden].

AMLA (Ascend's MLA kernel, "Multiply by Add"): a FlashAttention-style online
softmax over key blocks in base 2 whose running maximum is kept integral, so
rescaling the running output by 2^(m_old - m_new) is an integer add on the
float32 exponent bits instead of a floating-point multiply.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from actors.model.config import ModelConfig
from actors.model.layers import RMSNorm, apply_rope

LOG2E = 1.4426950408889634
AMLA_BLOCK = 16


def _causal_mask(tq: int, tk: int, q_start: int, k_start: int = 0) -> torch.Tensor:
    """True where query (absolute position q_start+i) may see key k_start+j."""
    qpos = torch.arange(q_start, q_start + tq)[:, None]
    kpos = torch.arange(k_start, k_start + tk)[None, :]
    return kpos <= qpos


def _expand_kv(k: torch.Tensor, hq: int) -> torch.Tensor:
    """[Hkv, S, D] -> [Hq, S, D] for grouped-query attention."""
    return k.repeat_interleave(hq // k.shape[0], dim=0) if k.shape[0] != hq else k


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_start: int) -> torch.Tensor:
    """Reference kernel. q [Hq, Tq, D], k [Hkv, S, D], v [Hkv, S, Dv] -> [Hq, Tq, Dv].

    Grouped-query heads attend as one block per KV head (the query heads that
    share it stacked as rows), so K and V are never copied per query head; a
    decode row (one query, at the end of its context) sees every key, so it
    needs no mask."""
    hq, tq, d = q.shape
    hkv, s_len = k.shape[0], k.shape[1]
    group = hq // hkv
    scores = torch.matmul(q.reshape(hkv, group * tq, d), k.transpose(-1, -2)) * scale  # [Hkv, G*Tq, S]
    if tq > 1 or q_start + 1 != s_len:
        scores = scores.masked_fill(~_causal_mask(tq, s_len, q_start).repeat(group, 1), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).reshape(hq, tq, v.shape[-1])


_FLOAT_BITS = {  # dtype -> (same-width int, mantissa bits, exponent mask)
    torch.float32: (torch.int32, 23, 0xFF),
    torch.float64: (torch.int64, 52, 0x7FF),
}


def exponent_add(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """x * 2**k for float32/float64 x and integer k <= 0, by adding k to the
    exponent field. Zeros stay zero; a result that would fall below the normal
    range flushes to zero (the exponent field cannot go under 1)."""
    int_dtype, mantissa, mask = _FLOAT_BITS[x.dtype]
    bits = x.view(int_dtype)
    exp = (bits >> mantissa) & mask
    k = k.to(int_dtype).expand_as(bits)
    shifted = bits + (k << mantissa)
    keep = (exp > 0) & (exp + k > 0)
    return torch.where(keep, shifted, torch.zeros_like(bits)).view(x.dtype)


def amla_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_start: int, block: int = AMLA_BLOCK
) -> torch.Tensor:
    """AMLA kernel with the same contract as `softmax_attention`.

    Per key block: s = q.k * scale * log2(e); m_new = max(m_old, ceil(max s));
    p = 2^(s - m_new); O = O * 2^(m_old - m_new) + p.v done as `exponent_add`;
    the row sum l likewise. Equal to softmax attention within float32 rounding
    (tests hold it to 1e-5 relative)."""
    out_dtype = q.dtype
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(work), _expand_kv(k, q.shape[0]).to(work), _expand_kv(v, q.shape[0]).to(work)
    hq, tq, _ = q.shape
    s_len = k.shape[1]
    acc = torch.zeros(hq, tq, v.shape[-1], dtype=work)
    row_sum = torch.zeros(hq, tq, 1, dtype=work)
    row_max = torch.full((hq, tq, 1), float("-inf"), dtype=work)
    for start in range(0, s_len, block):
        kb, vb = k[:, start : start + block], v[:, start : start + block]
        s = torch.matmul(q, kb.transpose(-1, -2)) * (scale * LOG2E)
        visible = _causal_mask(tq, kb.shape[1], q_start, start)
        s = s.masked_fill(~visible, float("-inf"))
        blk_max = torch.ceil(s.amax(dim=-1, keepdim=True))
        new_max = torch.maximum(row_max, blk_max)
        seen = torch.isfinite(new_max)
        # rows with nothing visible yet keep zero accumulators: shift 0
        shift = torch.where(torch.isfinite(row_max) & seen, row_max - new_max, torch.zeros_like(new_max))
        p = torch.exp2(torch.where(seen, s - new_max, torch.full_like(s, float("-inf"))))
        acc = exponent_add(acc, shift) + torch.matmul(p, vb)
        row_sum = exponent_add(row_sum, shift) + p.sum(dim=-1, keepdim=True)
        row_max = torch.where(seen, new_max, row_max)
    return (acc / row_sum).to(out_dtype)


KERNELS = {"softmax": softmax_attention, "amla": amla_attention}


class GQAAttention(nn.Module):
    """Grouped-query attention; the cache holds K and V per KV head."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, nh, nkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(h, nh * hd, bias=False)
        self.k_proj = nn.Linear(h, nkv * hd, bias=False)
        self.v_proj = nn.Linear(h, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, h, bias=False)
        self.kernel = KERNELS[cfg.attention_kernel]
        self.scale = 1.0 / math.sqrt(hd)

    def forward(self, x: torch.Tensor, batch, cache) -> torch.Tensor:
        cfg = self.cfg
        t = x.shape[0]
        q = self.q_proj(x).view(t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).view(t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(t, cfg.num_kv_heads, cfg.head_dim)
        cos, sin = batch.rope(cfg.head_dim, cfg.rope_theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = torch.empty(t, cfg.num_heads, cfg.head_dim, dtype=x.dtype)
        for seq, (k_all, v_all) in zip(batch.slices(), cache.append_batch(self.layer, batch, k, v)):
            rows = slice(seq.offset, seq.offset + seq.length)
            o = self.kernel(q[rows].transpose(0, 1), k_all.transpose(0, 1), v_all.transpose(0, 1), self.scale, seq.start_pos)
            out[rows] = o.transpose(0, 1)
        return self.o_proj(out.reshape(t, self.o_proj.in_features))


class MLAAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3, Pangu Ultra).

    The cache holds only the compressed latent c_kv and the shared RoPE key;
    attention runs in the absorbed form (queries mapped into latent space by
    W_uk, output mapped back by W_uv), which is what MLA decode kernels, AMLA
    among them, compute: one shared key/value head of width kv_lora_rank."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, nh = cfg.hidden_size, cfg.num_heads
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(h, nh * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nh * cfg.v_head_dim, h, bias=False)
        self.kernel = KERNELS[cfg.attention_kernel]
        self.scale = 1.0 / math.sqrt(cfg.qk_head_dim)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_lora_rank:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return self.q_proj(x)

    def forward(self, x: torch.Tensor, batch, cache) -> torch.Tensor:
        cfg = self.cfg
        t, nh, r = x.shape[0], cfg.num_heads, cfg.kv_lora_rank
        q = self._queries(x).view(t, nh, cfg.qk_head_dim)
        q_nope, q_rope = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        kv = self.kv_a_proj_with_mqa(x)
        c_kv, k_rope = self.kv_a_layernorm(kv[:, :r]), kv[:, r:]
        cos, sin = batch.rope(cfg.qk_rope_head_dim, cfg.rope_theta, x.dtype)
        q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
        w = self.kv_b_proj.weight.view(nh, cfg.qk_nope_head_dim + cfg.v_head_dim, r)
        w_uk, w_uv = w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim :]
        q_lat = torch.einsum("thn,hnr->thr", q_nope, w_uk)
        query = torch.cat([q_lat, q_rope], dim=-1)  # [T, H, r + rope]
        out_lat = torch.empty(t, nh, r, dtype=x.dtype)
        for seq, (c_all, kr_all) in zip(batch.slices(), cache.append_batch(self.layer, batch, c_kv, k_rope)):
            rows = slice(seq.offset, seq.offset + seq.length)
            key = torch.cat([c_all, kr_all], dim=-1)[None]  # one shared head
            o = self.kernel(query[rows].transpose(0, 1), key, c_all[None], self.scale, seq.start_pos)
            out_lat[rows] = o.transpose(0, 1)
        out = torch.einsum("thr,hvr->thv", out_lat, w_uv)
        return self.o_proj(out.reshape(t, self.o_proj.in_features))


def build_attention(cfg: ModelConfig, layer: int) -> nn.Module:
    return MLAAttention(cfg, layer) if cfg.attention == "mla" else GQAAttention(cfg, layer)
