"""Attention kernels (softmax reference and AMLA), the exponent-add rescale,
the MLA absorbed form, and the model-level equivalences built on them."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.model.attention import AMLA_BLOCK, amla_attention, exponent_add, softmax_attention
from actors.model.batch import ForwardBatch
from actors.model.kv_store import SequenceKVStore
from actors.model.layers import apply_rope, rope_cos_sin
from actors.model.moe import LocalExperts
from actors.model.reference import build_reference, generate

from helpers import tiny


pytestmark = [pytest.mark.fast, pytest.mark.usefixtures("one_thread")]



def naive_attention(q, k, v, scale, q_start):
    """Per head, per query row, in float64 with an explicit loop over visible keys."""
    hq, tq, _ = q.shape
    hkv = k.shape[0]
    group = hq // hkv
    out = torch.zeros(hq, tq, v.shape[-1], dtype=torch.float64)
    for h in range(hq):
        kh, vh = k[h // group].double(), v[h // group].double()
        for i in range(tq):
            n = q_start + i + 1  # keys 0 .. q_start+i are visible
            s = (kh[:n] @ q[h, i].double()) * scale
            p = torch.softmax(s, dim=0)
            out[h, i] = p @ vh[:n]
    return out


def make_qkv(hq, hkv, tq, s, d, dv, dtype, seed, q_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, tq, d, generator=gen, dtype=torch.float64) * q_scale
    k = torch.randn(hkv, s, d, generator=gen, dtype=torch.float64)
    v = torch.randn(hkv, s, dv, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# (Hq, Hkv, D, Dv)
HEADS = {"gqa": (4, 2, 16, 16), "mla": (4, 1, 40, 32), "mha": (2, 2, 8, 8)}
# (S, Tq, q_start): prefill, decode, chunked prefill; S a multiple of the block or not
POSITIONS = {
    "prefill": (37, 37, 0),
    "prefill_block_multiple": (2 * AMLA_BLOCK, 2 * AMLA_BLOCK, 0),
    "prefill_short": (5, 5, 0),
    "decode": (45, 1, 44),
    "decode_first": (1, 1, 0),
    "decode_block_edge": (AMLA_BLOCK + 1, 1, AMLA_BLOCK),
    "chunked": (50, 13, 37),
    "chunked_mid": (40, 7, 20),
}
# float32 rounding depends on the CPU's vector kernels (summation order differs between
# machines: 7e-6 abs on scores up to 120 was seen on an AMD EPYC); an algorithmic error
# would be O(1). float64 keeps the exactness check.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("pos", list(POSITIONS), ids=list(POSITIONS))
@pytest.mark.parametrize("heads", list(HEADS), ids=list(HEADS))
@pytest.mark.parametrize("q_scale", [1.0, 30.0], ids=["q1", "q30"])
def test_amla_equals_softmax(heads, pos, dtype, q_scale):
    hq, hkv, d, dv = HEADS[heads]
    s, tq, q_start = POSITIONS[pos]
    seed = zlib.crc32(f"{heads}/{pos}".encode())
    q, k, v = make_qkv(hq, hkv, tq, s, d, dv, dtype, seed=seed, q_scale=q_scale)
    scale = 1.0 / math.sqrt(d)
    ref = softmax_attention(q, k, v, scale, q_start)
    got = amla_attention(q, k, v, scale, q_start)
    assert got.shape == (hq, tq, dv) and got.dtype == dtype
    assert bool(torch.isfinite(got).all())
    if dtype == torch.float32 and q_scale > 1:
        # |scores| ~ 100 here: rounding a float32 score alone moves exp(score) by
        # ~|s| * 6e-8 ~ 1e-5 relative, for any kernel. So AMLA is held to be as
        # accurate as the softmax kernel against the exact (float64) answer on the
        # same float32 inputs, and to agree with it within that rounding.
        truth = softmax_attention(q.double(), k.double(), v.double(), scale, q_start)
        amla_err = (got.double() - truth).abs().max().item()
        soft_err = (ref.double() - truth).abs().max().item()
        assert amla_err <= 2 * soft_err + 1e-6, (amla_err, soft_err)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got, ref, **TOL[dtype])


@pytest.mark.parametrize("heads", list(HEADS), ids=list(HEADS))
@pytest.mark.parametrize("pos", ["prefill", "decode", "chunked"])
def test_softmax_attention_matches_naive(heads, pos):
    """The reference kernel itself: causal mask at q_start and the GQA head mapping."""
    hq, hkv, d, dv = HEADS[heads]
    s, tq, q_start = POSITIONS[pos]
    q, k, v = make_qkv(hq, hkv, tq, s, d, dv, torch.float64, seed=5)
    scale = 1.0 / math.sqrt(d)
    torch.testing.assert_close(softmax_attention(q, k, v, scale, q_start), naive_attention(q, k, v, scale, q_start))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("block", [1, 3, 16, 64])
def test_amla_running_max_jumps_between_blocks(dtype, block):
    """Scores that grow block after block (each new block's max beats the old one
    by a lot), then a block with a far smaller max: every rescale path is taken."""
    hq, d, s = 2, 8, 70
    gen = torch.Generator().manual_seed(3)
    direction = torch.randn(d, generator=gen, dtype=torch.float64)
    direction /= direction.norm()
    mags = torch.linspace(0.0, 1.0, s, dtype=torch.float64) ** 2 * 120.0
    mags[60:] = -50.0  # later keys score far below the running max
    k = (mags[:, None] * direction[None, :] + 0.3 * torch.randn(s, d, generator=gen, dtype=torch.float64))[None]
    v = torch.randn(1, s, 6, generator=gen, dtype=torch.float64)
    q = (direction[None, None, :] * torch.tensor([1.0, -0.5], dtype=torch.float64)[:, None, None]).expand(hq, s, d)
    q = q + 0.1 * torch.randn(hq, s, d, generator=gen, dtype=torch.float64)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    ref = softmax_attention(q, k, v, 1.0, 0)
    got = amla_attention(q, k, v, 1.0, 0, block=block)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, ref, **TOL[dtype])


def test_amla_block_size_is_irrelevant_in_float64():
    q, k, v = make_qkv(4, 2, 11, 29, 16, 12, torch.float64, seed=9, q_scale=10.0)
    outs = [amla_attention(q, k, v, 0.25, 18, block=b) for b in (1, 2, 7, 16, 29, 100)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-12, atol=1e-12)


# ---- exponent_add -------------------------------------------------------------

NP_FLOAT = {torch.float32: np.float32, torch.float64: np.float64}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_exponent_add_equals_multiply_by_power_of_two(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, 8, generator=gen, dtype=torch.float64) * torch.logspace(-6, 6, 8, dtype=torch.float64)
    x = x.to(dtype)
    k = torch.randint(-40, 1, (6, 50, 1), generator=gen).to(dtype)  # integral, as AMLA passes it
    got = exponent_add(x, k)
    assert got.dtype == dtype and got.shape == x.shape
    expected = x * torch.pow(torch.tensor(2.0, dtype=dtype), k)
    assert torch.equal(got, expected)
    # per-element k too, and an int k tensor
    k_full = torch.randint(-40, 1, x.shape, generator=gen)
    assert torch.equal(exponent_add(x, k_full), torch.from_numpy(np.ldexp(x.numpy(), k_full.numpy())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_exponent_add_zero_and_identity(dtype):
    x = torch.tensor([0.0, -0.0, 1.5, -3.25, 0.0], dtype=dtype)
    k = torch.tensor([-5.0, -40.0, 0.0, 0.0, 0.0], dtype=dtype)
    got = exponent_add(x, k)
    assert got.tolist() == [0.0, 0.0, 1.5, -3.25, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_exponent_add_underflow_flushes_to_zero(dtype):
    tiny = torch.finfo(dtype).tiny  # smallest normal
    x = torch.tensor([tiny, -tiny, tiny * 2.0, tiny * 1.75, tiny * 2**10, tiny * 2**10], dtype=dtype)
    k = torch.tensor([-1.0, -1.0, -2.0, -40.0, -10.0, -11.0], dtype=dtype)
    got = exponent_add(x, k)
    # results below the normal range are exactly zero, never a wrapped exponent or flipped sign
    assert got.tolist()[:4] == [0.0, 0.0, 0.0, 0.0]
    assert got[4].item() == tiny  # lands exactly on the smallest normal: kept
    assert got[5].item() == 0.0
    assert bool(torch.isfinite(got).all())


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    k=st.integers(-40, 0),
)
def test_exponent_add_property(data, dtype, k):
    """For any finite x: the exact x*2^k when that is a normal number (x normal
    too), otherwise zero. Never garbage."""
    width = 32 if dtype == torch.float32 else 64
    xv = data.draw(st.floats(allow_nan=False, allow_infinity=False, width=width))
    np_t = NP_FLOAT[dtype]
    exact = np.ldexp(np_t(xv), k)
    x = torch.tensor([xv], dtype=dtype)
    got = exponent_add(x, torch.tensor([k], dtype=dtype)).item()
    tiny = float(torch.finfo(dtype).tiny)
    if abs(xv) >= tiny and abs(float(exact)) >= tiny:
        assert got == float(exact)
    else:
        assert got == 0.0


# ---- MLA absorbed form --------------------------------------------------------


def test_mla_absorbed_equals_explicit_heads():
    """MLAAttention attends in latent space; it must equal decompressing the
    latent into per-head keys/values and running ordinary multi-head attention."""
    cfg = tiny("tiny-mla-topk", attention_kernel="softmax")
    model = build_reference(cfg)
    attn = model.layers[0].self_attn
    gen = torch.Generator().manual_seed(4)
    t = 9
    x = torch.randn(t, cfg.hidden_size, generator=gen, dtype=torch.float64)
    batch = ForwardBatch.build([("a", list(range(t)), 0)])
    with torch.no_grad():
        got = attn(x, batch, SequenceKVStore())

        nh, r = cfg.num_heads, cfg.kv_lora_rank
        dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q = attn._queries(x).view(t, nh, dn + dr)
        q_nope, q_rope = q.split([dn, dr], dim=-1)
        kv = attn.kv_a_proj_with_mqa(x)
        c, k_rope = attn.kv_a_layernorm(kv[:, :r]), kv[:, r:]
        cos, sin = rope_cos_sin(batch.positions, dr, cfg.rope_theta, x.dtype)
        q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
        kvb = attn.kv_b_proj(c).view(t, nh, dn + dv)
        k_nope, v = kvb[..., :dn], kvb[..., dn:]
        k = torch.cat([k_nope, k_rope[:, None, :].expand(t, nh, dr)], dim=-1)
        q_full = torch.cat([q_nope, q_rope], dim=-1)
        o = naive_attention(q_full.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), 1 / math.sqrt(dn + dr), 0)
        expected = attn.o_proj(o.transpose(0, 1).reshape(t, nh * dv))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# ---- model level --------------------------------------------------------------

PROMPTS = [[5, 17, 300, 42, 9, 88, 123], [7, 7, 256, 1, 400, 33, 2, 19, 77, 61, 4, 140, 230, 18, 501, 11, 90, 3, 45]]


@pytest.mark.parametrize("base", ["tiny-mla-topk", "tiny-gqa-moge"])
def test_model_amla_and_softmax_same_greedy_tokens(base):
    soft = build_reference(tiny(base, attention_kernel="softmax"))
    amla = build_reference(tiny(base, attention_kernel="amla"))
    a = generate(soft, PROMPTS, 12, keep_logits=True)
    b = generate(amla, PROMPTS, 12, keep_logits=True)
    assert a.tokens == b.tokens
    assert all(len(t) == 12 for t in a.tokens)
    for la, lb in zip(a.logits, b.logits):
        torch.testing.assert_close(torch.stack(la), torch.stack(lb), rtol=0, atol=1e-6)


def run_hidden(model, steps: list[list[int]]) -> torch.Tensor:
    """Feed the chunks of one sequence step by step; the last row's final hidden state."""
    cache, start, hidden = SequenceKVStore(), 0, None
    with torch.no_grad():
        for chunk in steps:
            batch = ForwardBatch.build([("s", chunk, start)])
            hidden = model(batch, cache, LocalExperts())[-1]
            start += len(chunk)
    assert cache.length("s") == start
    return hidden


@pytest.mark.parametrize("base", ["tiny-mla-topk", "tiny-gqa-moge"])
def test_incremental_decode_equals_full_recompute(base):
    model = build_reference(tiny(base))
    prompt = PROMPTS[1]
    out = generate(model, [prompt], 6, keep_logits=True)
    toks = out.tokens[0]
    assert len(toks) == 6 and len(out.logits[0]) == 6
    full = generate(model, [prompt + toks[:-1]], 1, keep_logits=True)
    assert full.tokens[0][0] == toks[-1]
    torch.testing.assert_close(full.logits[0][0], out.logits[0][-1], rtol=0, atol=1e-9)
    # the same at the float64 hidden state (not rounded through the logits)
    inc = run_hidden(model, [prompt] + [[t] for t in toks[:-1]])
    one = run_hidden(model, [prompt + toks[:-1]])
    chunked = run_hidden(model, [prompt[:4], prompt[4:13], prompt[13:] + toks[:2], toks[2:-1]])
    assert inc.dtype == torch.float64
    torch.testing.assert_close(inc, one, rtol=0, atol=1e-9)
    torch.testing.assert_close(chunked, one, rtol=0, atol=1e-9)
