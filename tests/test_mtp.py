"""MTP heads and MTP self-speculative decoding.

Speculation must never change what greedy decoding emits, so every test holds
the tokens to `reference.generate`'s exactly. Random MTP weights rarely guess
the main model's token, so acceptance is checked two ways: on the random model,
each round's accepted count is recomputed from the reference tokens; on a
constructed "copy" model, where the MTP head provably predicts what the main
model will say, every draft must be accepted and forward passes drop to
1 + ceil((N - 1) / (k + 1)).
"""

from __future__ import annotations

import math

import helpers
import pytest
import torch

from actors.model.config import ModelConfig
from actors.model.model import MoEModel
from actors.model.reference import build_reference, generate
from actors.model.speculative import TruncatableKVStore, speculative_generate

pytestmark = pytest.mark.fast

PROMPTS = [[5, 17, 300, 42, 9], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [400, 401]]


def tiny(name: str, mtp: int = 1) -> ModelConfig:
    return helpers.tiny(name, num_mtp_layers=mtp)


CFGS = {"gqa-moge": tiny("tiny-gqa-moge"), "mla-topk": tiny("tiny-mla-topk")}


@pytest.fixture(scope="module", params=list(CFGS))
def model(request) -> MoEModel:
    return build_reference(CFGS[request.param])


def make_copy_model(cfg: ModelConfig, leak: float = 0.0) -> MoEModel:
    """Main layers and the MTP layer become identities (every o_proj and
    down_proj zeroed), so the main model's pre-norm hidden at i is Emb(t_i) and
    its next token is f(t_i) = argmax(W norm(Emb t_i)). eh_proj = [0 | I] makes
    the MTP output enorm(Emb t_{i+1}), whose prediction is argmax of a positive
    multiple of the same logits: f(t_{i+1}), exactly the main model's t_{i+2}.
    leak > 0 keeps that fraction of the main layers' outputs, so the main model
    drifts from f and only some drafts are right (partial acceptance)."""
    m = build_reference(cfg)
    h = cfg.hidden_size
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(0.0 if name.startswith("mtp.") else leak)
        m.mtp[0].eh_proj.weight.copy_(torch.cat([torch.zeros(h, h), torch.eye(h)], dim=1))
    return m


def check_trace(out, ref_tokens):
    """Every round's accepted count is the longest draft prefix the reference agrees with."""
    stats = out.stats
    assert stats.drafted == sum(len(d) for _, _, d, _ in stats.trace)
    assert stats.accepted == sum(n for *_, n in stats.trace)
    for i, start, drafts, n in stats.trace:
        truth = ref_tokens[i][start : start + len(drafts)]
        want = 0
        while want < len(drafts) and drafts[want] == truth[want]:
            want += 1
        assert n == want, (i, start, drafts, truth)
    assert 0.0 <= stats.acceptance_rate <= 1.0
    assert stats.acceptance_rate == (stats.accepted / stats.drafted if stats.drafted else 0.0)


@pytest.mark.parametrize("name", list(CFGS))
@pytest.mark.parametrize("mtp", [0, 1, 2])
def test_parameter_count_matches_config(name, mtp):
    cfg = CFGS[name].model_copy(update={"num_mtp_layers": mtp})
    m = MoEModel(cfg)
    counts = cfg.parameter_counts()
    assert sum(p.numel() for p in m.parameters()) == counts.total
    assert sum(p.numel() for n, p in m.named_parameters() if n.startswith("mtp.")) == counts.mtp
    assert (m.mtp is None) == (mtp == 0)


def test_mtp_layer_caches_under_its_own_index():
    cfg = CFGS["gqa-moge"]
    m = build_reference(cfg)
    assert m.mtp[0].layer.self_attn.layer == cfg.num_layers
    assert all(layer.self_attn.layer < cfg.num_layers for layer in m.layers)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_tokens_equal_reference(model, k):
    n_new = 9
    ref = generate(model, PROMPTS, n_new).tokens
    out = speculative_generate(model, PROMPTS, n_new, num_draft=k)
    assert out.tokens == ref
    assert all(len(t) == n_new for t in out.tokens)
    check_trace(out, ref)
    assert out.stats.drafted > 0


@pytest.mark.parametrize("name", list(CFGS))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_copy_head_accepts_every_draft(name, k):
    m = make_copy_model(CFGS[name])
    n_new = 10
    ref = generate(m, PROMPTS, n_new).tokens
    out = speculative_generate(m, PROMPTS, n_new, num_draft=k)
    assert out.tokens == ref
    check_trace(out, ref)
    assert out.stats.drafted > 0 and out.stats.accepted == out.stats.drafted
    assert out.stats.acceptance_rate == 1.0
    # all prompts advance in lockstep: prefill + ceil((N-1)/(k+1)) verify passes
    assert out.stats.forward_passes == 1 + math.ceil((n_new - 1) / (k + 1))
    assert out.stats.forward_passes < n_new


@pytest.mark.parametrize("name", list(CFGS))
def test_partial_acceptance_rolls_back(name):
    """Rounds that accept some but not all drafts must drop exactly the rejected
    positions from the main cache, or later tokens would differ from the reference."""
    m = make_copy_model(CFGS[name], leak=0.05)
    n_new, k = 12, 3
    ref = generate(m, PROMPTS, n_new).tokens
    out = speculative_generate(m, PROMPTS, n_new, num_draft=k)
    assert out.tokens == ref
    check_trace(out, ref)
    assert 0 < out.stats.accepted < out.stats.drafted
    assert any(0 < n < len(d) for _, _, d, n in out.stats.trace)
    assert out.stats.forward_passes < n_new


def test_max_new_tokens_exact_and_stop_tokens(model):
    for n_new in (1, 2, 5):
        out = speculative_generate(model, PROMPTS, n_new, num_draft=3)
        assert out.tokens == generate(model, PROMPTS, n_new).tokens
    full = generate(model, PROMPTS, 8).tokens
    stop = {full[0][3], full[2][1]}
    ref = generate(model, PROMPTS, 8, stop_token_ids=stop).tokens
    assert speculative_generate(model, PROMPTS, 8, num_draft=2, stop_token_ids=stop).tokens == ref


def test_truncate_rolls_back_chosen_layers():
    cache = TruncatableKVStore()
    for layer in (0, 1, 5):
        cache.append("s", layer, torch.arange(6.0)[:, None], torch.arange(6.0)[:, None])
    cache.truncate("s", 4, {0, 1})
    kv = cache.export("s")
    assert [int(kv[layer][0].shape[0]) for layer in (0, 1, 5)] == [4, 4, 6]
    assert cache.length("s") == 4
    full = cache.append("s", 0, torch.tensor([[9.0]]), torch.tensor([[9.0]]))
    assert full[0].flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 9.0]


def test_needs_mtp_heads():
    m = build_reference(CFGS["gqa-moge"].model_copy(update={"num_mtp_layers": 0}))
    with pytest.raises(ValueError):
        speculative_generate(m, PROMPTS, 4)
