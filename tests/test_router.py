"""Routers: MoGE picks k/G experts in every group (so group loads are equal by
construction), plain top-k does not; load counting and the imbalance score."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.model.config import ModelConfig
from actors.model.router import (
    MoGERouter,
    TopKRouter,
    build_router,
    expert_load,
    group_load,
    imbalance_score,
)

pytestmark = pytest.mark.fast

HIDDEN = 16
# (num_experts, num_expert_groups, num_experts_per_tok)
MOGE_SHAPES = [(8, 4, 4), (16, 4, 8), (64, 8, 8)]


def moge_cfg(e: int, g: int, k: int, **kw) -> ModelConfig:
    return ModelConfig(
        hidden_size=HIDDEN, num_experts=e, num_expert_groups=g, num_experts_per_tok=k, router="moge", **kw
    )


def make_router(cfg: ModelConfig, seed: int, dtype=torch.float32):
    router = build_router(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
    return router.to(dtype)


def random_x(t: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(t, HIDDEN, generator=gen).to(dtype)


def test_build_router_picks_class():
    assert isinstance(build_router(moge_cfg(8, 4, 4)), MoGERouter)
    assert isinstance(build_router(ModelConfig(hidden_size=HIDDEN)), TopKRouter)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from(MOGE_SHAPES),
    t=st.integers(1, 64),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_moge_picks_k_over_g_per_group(shape, t, seed, dtype):
    e, g, k = shape
    cfg = moge_cfg(e, g, k)
    router = make_router(cfg, seed, dtype)
    x = random_x(t, seed, dtype)
    out = router(x)
    ids, w = out.expert_ids, out.weights
    assert ids.shape == (t, k) and w.shape == (t, k)
    assert ids.dtype == torch.int64
    assert w.dtype == dtype
    assert int(ids.min()) >= 0 and int(ids.max()) < e
    group_size = e // g
    groups = ids // group_size
    for tok in range(t):
        assert len(set(ids[tok].tolist())) == k, f"duplicate experts for token {tok}: {ids[tok].tolist()}"
        per_group = torch.bincount(groups[tok], minlength=g)
        assert per_group.tolist() == [k // g] * g
    # normalised combine weights
    torch.testing.assert_close(w.sum(-1).double(), torch.ones(t, dtype=torch.float64), rtol=0, atol=1e-6)
    assert bool((w > 0).all())
    # inside each group the chosen experts are the best-scored ones of that group
    scores = torch.softmax((x.double() @ router.weight.double().t()), dim=-1).view(t, g, group_size)
    for tok in range(t):
        for grp in range(g):
            chosen = sorted(i - grp * group_size for i in ids[tok].tolist() if i // group_size == grp)
            others = [j for j in range(group_size) if j not in chosen]
            if others:
                worst_chosen = scores[tok, grp, chosen].min()
                best_other = scores[tok, grp, others].max()
                assert worst_chosen >= best_other - 1e-6


def test_moge_weights_unnormalised_are_scores_times_scale():
    cfg = moge_cfg(8, 4, 4, norm_topk_prob=False, routed_scaling_factor=2.5)
    router = make_router(cfg, 3, torch.float64)
    x = random_x(10, 3, torch.float64)
    out = router(x)
    scores = torch.softmax(x @ router.weight.t(), dim=-1)
    expected = torch.gather(scores, 1, out.expert_ids) * 2.5
    torch.testing.assert_close(out.weights, expected, rtol=1e-6, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from(MOGE_SHAPES), t=st.integers(0, 100), seed=st.integers(0, 2**31 - 1))
def test_moge_imbalance_is_zero_for_any_batch(shape, t, seed):
    e, g, k = shape
    cfg = moge_cfg(e, g, k)
    router = make_router(cfg, seed)
    ids = router(random_x(t, seed)).expert_ids
    load = expert_load(ids, e)
    assert load.shape == (e,)
    assert int(load.sum()) == t * k
    groups = group_load(load, g)
    assert groups.tolist() == [t * k // g] * g
    assert imbalance_score(groups) == 0.0


def skewed_router(cfg: ModelConfig) -> torch.nn.Module:
    """Experts 0 and 1 score far above the rest for any positive input."""
    router = make_router(cfg, 0)
    with torch.no_grad():
        router.weight.mul_(0.01)
        router.weight[0:2] = 1.0
    return router


def test_topk_skewed_input_is_imbalanced_where_moge_is_not():
    e, g, k, t = 8, 4, 4, 32
    x = random_x(t, 11).abs() + 0.1  # positive inputs: experts 0, 1 dominate
    topk = skewed_router(ModelConfig(hidden_size=HIDDEN, num_experts=e, num_experts_per_tok=k, router="topk"))
    ids = topk(x).expert_ids
    assert bool(((ids == 0).any(-1) & (ids == 1).any(-1)).all()), "experts 0 and 1 should win every token"
    load = expert_load(ids, e)
    assert int(load.sum()) == t * k
    assert load[0].item() == t and load[1].item() == t
    groups = group_load(load, g)
    assert int(groups.sum()) == t * k
    assert groups[0].item() >= 2 * t  # group 0 holds both hot experts
    assert imbalance_score(groups) > 0.0

    moge = skewed_router(moge_cfg(e, g, k))
    moge_ids = moge(x).expert_ids
    moge_groups = group_load(expert_load(moge_ids, e), g)
    assert moge_groups.tolist() == [t * k // g] * g
    assert imbalance_score(moge_groups) == 0.0
    # MoGE takes only one of the two hot experts (they share group 0)
    assert bool(((moge_ids == 0) | (moge_ids == 1)).sum(-1).eq(1).all())


def test_expert_load_counts():
    ids = torch.tensor([[0, 3], [3, 1], [3, 0]])
    assert expert_load(ids, 5).tolist() == [2, 1, 0, 3, 0]
    assert group_load(torch.tensor([2, 1, 0, 3, 0, 4]), 3).tolist() == [3, 3, 4]


def test_imbalance_score_values():
    assert imbalance_score(torch.tensor([3, 3, 3, 3])) == 0.0
    assert imbalance_score(torch.tensor([5.0, 5.0])) == 0.0
    assert imbalance_score(torch.tensor([4, 0, 0, 0])) == 4.0
    assert imbalance_score(torch.tensor([0, 0, 0])) == 0.0
    assert imbalance_score(torch.tensor([1, 3])) == pytest.approx(1.0)


def test_router_keeps_float64_precision():
    cfg = moge_cfg(8, 4, 4)
    router = make_router(cfg, 3, torch.float64)
    x = random_x(10, 3, torch.float64)
    out = router(x)
    scores = torch.softmax(x @ router.weight.t(), dim=-1)
    chosen = torch.gather(scores, 1, out.expert_ids)
    expected = chosen / chosen.sum(-1, keepdim=True)
    torch.testing.assert_close(out.weights, expected, rtol=0, atol=1e-12)
