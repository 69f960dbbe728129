"""Roofline cost model: the shapes of the curves schedulers rely on."""

import pytest

from actors.cost_model import CostModel, StepCost
from actors.devices import get_device
from actors.model.config import ModelConfig


def deepseek_like(**kw) -> ModelConfig:
    """DeepSeek-V3-shaped config (MLA, 256 experts, top-8), few layers to stay quick."""
    base = dict(
        name="ds-like", vocab_size=129280, hidden_size=7168, num_layers=4, first_k_dense_layers=1,
        attention="mla", num_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        intermediate_size=18432, moe_intermediate_size=2048, num_experts=256,
        num_experts_per_tok=8, num_shared_experts=1,
        dtype="bfloat16", weight_dtype="bfloat16", kv_dtype="bfloat16",
    )
    base.update(kw)
    return ModelConfig(**base)


def gqa_like(**kw) -> ModelConfig:
    base = dict(
        hidden_size=4096, num_layers=2, num_heads=32, num_kv_heads=8, head_dim=128,
        num_experts=64, num_experts_per_tok=8, moe_intermediate_size=1408,
        dtype="bfloat16", weight_dtype="bfloat16", kv_dtype="bfloat16",
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def cm():
    return CostModel(get_device("910B"))


@pytest.mark.parametrize("make", [deepseek_like, gqa_like])
def test_more_tokens_is_never_faster(cm, make):
    cfg = make()
    prev_attn = prev_moe = prev_step = 0.0
    for t in [1, 2, 4, 16, 64, 256, 1024, 4096]:
        attn = cm.attention_time(cfg, t, context_tokens=t * 100, num_seqs=t)
        moe = cm.moe_time(cfg, t * cfg.num_experts_per_tok, num_local_experts=32)
        step = cm.step_time(cfg, t, t * 100, t, ep_size=8, num_local_experts=32).total_s
        assert attn >= prev_attn and moe >= prev_moe and step >= prev_step
        prev_attn, prev_moe, prev_step = attn, moe, step
    # longer context never faster either
    assert cm.attention_time(cfg, 8, 8 * 4096, 8) > cm.attention_time(cfg, 8, 8 * 128, 8)


@pytest.mark.parametrize("make", [deepseek_like, gqa_like])
def test_small_batch_decode_is_memory_bound(cm, make):
    cfg = make()
    attn = cm.attention_roofline(cfg, num_tokens=8, context_tokens=8 * 1024, num_seqs=8)
    assert attn.memory_bound and attn.memory_s > 5 * attn.compute_s
    moe = cm.moe_roofline(cfg, num_tokens_routed=8 * cfg.num_experts_per_tok, num_local_experts=32)
    assert moe.memory_bound and moe.memory_s > 5 * moe.compute_s


@pytest.mark.parametrize("make", [deepseek_like, gqa_like])
def test_large_prefill_is_compute_bound(cm, make):
    cfg = make()
    attn = cm.attention_roofline(cfg, num_tokens=8192, context_tokens=8192, num_seqs=1)
    assert not attn.memory_bound and attn.compute_s > attn.memory_s
    moe = cm.moe_roofline(cfg, num_tokens_routed=8192 * cfg.num_experts_per_tok, num_local_experts=32)
    assert not moe.memory_bound
    ffn = cm.dense_ffn_roofline(cfg, 8192, cfg.intermediate_size)
    assert not ffn.memory_bound


def test_moe_reads_only_touched_experts(cm):
    cfg = deepseek_like()
    one = cm.moe_roofline(cfg, 1, 32)
    many = cm.moe_roofline(cfg, 1000, 32)
    expert_bytes = cfg.expert_params() * 2
    assert one.nbytes == pytest.approx(expert_bytes + 2 * cfg.hidden_size * 2)
    assert many.nbytes - 2000 * cfg.hidden_size * 2 == pytest.approx(32 * expert_bytes)
    assert many.flops == pytest.approx(1000 * 2 * 3 * cfg.hidden_size * cfg.moe_intermediate_size)


def test_all_to_all(cm):
    assert cm.all_to_all_time(10**9, 1) == 0.0
    small, big = cm.all_to_all_time(10**6, 8), cm.all_to_all_time(10**8, 8)
    assert 0 < small < big
    assert cm.all_to_all_time(0, 8) == pytest.approx(cm.collective_latency_s)
    dev = cm.device
    assert big == pytest.approx(cm.collective_latency_s + 7 / 8 * 10**8 / dev.interconnect_bandwidth)
    assert cm.all_to_all_time(10**8, 8, intra_node=False) > big  # RoCE is slower than HCCS


def test_int8_weights_speed_up_memory_bound_decode(cm):
    bf16, int8 = deepseek_like(), deepseek_like(weight_dtype="int8")
    args = dict(num_tokens=16, context_tokens=16 * 2048, num_seqs=16, ep_size=16, num_local_experts=16)
    t16, t8 = cm.step_time(bf16, **args), cm.step_time(int8, **args)
    assert t8.total_s < t16.total_s
    assert t8.moe_s < 0.6 * t16.moe_s  # expert weights halve, experts dominate bytes


def test_amla_uses_higher_attention_efficiency(cm):
    soft = deepseek_like(attention_kernel="softmax")
    amla = deepseek_like(attention_kernel="amla")
    a = cm.attention_roofline(soft, 8192, 8192, 1)
    b = cm.attention_roofline(amla, 8192, 8192, 1)
    assert b.compute_s == pytest.approx(a.compute_s * 0.6 / 0.868)
    custom = CostModel(get_device("910B"), attention_efficiency={"amla": 0.5})
    assert custom.attention_roofline(amla, 8192, 8192, 1).compute_s > a.compute_s


def test_step_cost_parts_add_up(cm):
    cfg = deepseek_like()
    step = cm.step_time(cfg, 64, 64 * 1000, 64, ep_size=32, num_local_experts=8)
    assert isinstance(step, StepCost)
    parts = [step.attention_s, step.moe_s, step.dense_s, step.all_to_all_s, step.other_s]
    assert all(p > 0 for p in parts)
    assert step.total_s == pytest.approx(sum(parts))
    assert step.attention_s == pytest.approx(cfg.num_layers * cm.attention_time(cfg, 64, 64000, 64))
    n_moe = len(cfg.moe_layers)
    a2a_bytes = 64 * cfg.num_experts_per_tok * cfg.hidden_size * 2
    assert step.all_to_all_s == pytest.approx(n_moe * 2 * cm.all_to_all_time(a2a_bytes, 32))
    # one NPU: no all-to-all
    assert cm.step_time(cfg, 64, 64000, 64, ep_size=1, num_local_experts=256).all_to_all_s == 0.0


def test_faster_chip_is_faster():
    cfg = deepseek_like()
    args = dict(num_tokens=32, context_tokens=32 * 1024, num_seqs=32, ep_size=16, num_local_experts=16)
    t_b = CostModel(get_device("910B")).step_time(cfg, **args).total_s
    t_c = CostModel(get_device("910C")).step_time(cfg, **args).total_s
    t_duo = CostModel(get_device("300I Duo")).step_time(cfg, **args).total_s
    assert t_c < t_b < t_duo


def test_bad_efficiency_rejected():
    with pytest.raises(ValueError):
        CostModel(get_device("910B"), compute_efficiency=1.5)
