"""Cost model: the shapes of the curves schedulers rely on, and each term's own law."""

from dataclasses import replace

import pytest

from actors.cost_model import CostModel, DieBatch, StepCost, split_dies
from actors.devices import Calibration, get_device
from actors.model.config import ModelConfig

pytestmark = pytest.mark.fast


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


def decode(seqs: int, context: int) -> DieBatch:
    return DieBatch.of([(context, 1, True)] * seqs)


def prefill(seqs: int, length: int) -> DieBatch:
    return DieBatch.of([(0, length, False)] * seqs)


@pytest.fixture
def cm():
    return CostModel(get_device("910B"))


def test_die_batch_counts_causal_pairs_and_rows():
    b = DieBatch.of([(0, 4, False), (10, 1, True), (10, 2, True)])
    assert b.num_seqs == 3 and b.num_tokens == 7 and b.kv_tokens == 4 + 11 + 12
    assert b.prefill_pairs == 4 * 5 / 2  # causal: query i sees keys 0..i
    assert b.decode_pairs == (10 + 1) + (2 * 10 + 3)  # a draft row also sees its token
    assert b.prefill_context == 4 and b.logit_rows == 1 + 1 + 2  # a prompt samples once, a draft row twice


@pytest.mark.parametrize("make", [deepseek_like, gqa_like])
def test_more_tokens_is_never_faster(cm, make):
    cfg = make()
    prev_proj = prev_core = prev_moe = prev_step = 0.0
    for t in [1, 2, 4, 16, 64, 256, 1024, 4096]:
        proj, core = cm.attention_roofline(cfg, decode(t, 100))
        moe = cm.moe_roofline(cfg, t * cfg.num_experts_per_tok, local_experts=32).seconds
        step = cm.step_time(cfg, decode(t, 100), ep_dies=8).total_s
        assert proj.seconds >= prev_proj and core.seconds >= prev_core and moe >= prev_moe and step >= prev_step
        prev_proj, prev_core, prev_moe, prev_step = proj.seconds, core.seconds, moe, step
    # longer context never faster either
    assert cm.attention_roofline(cfg, decode(8, 4096))[1].seconds > cm.attention_roofline(cfg, decode(8, 128))[1].seconds


@pytest.mark.parametrize("make", [deepseek_like, gqa_like])
def test_small_batch_decode_is_memory_bound(cm, make):
    cfg = make()
    proj, core = cm.attention_roofline(cfg, decode(8, 1024))
    assert proj.memory_bound and proj.memory_s > 5 * proj.compute_s
    moe = cm.moe_roofline(cfg, 8 * cfg.num_experts_per_tok, local_experts=32)
    assert moe.memory_bound and moe.memory_s > 5 * moe.compute_s


@pytest.mark.parametrize("make", [deepseek_like, gqa_like])
def test_large_prefill_is_compute_bound(cm, make):
    cfg = make()
    proj, core = cm.attention_roofline(cfg, prefill(1, 8192))
    assert not proj.memory_bound and not core.memory_bound
    assert not cm.moe_roofline(cfg, 8192 * cfg.num_experts_per_tok, local_experts=32).memory_bound
    assert not cm.ffn_roofline(cfg, 8192, cfg.intermediate_size).memory_bound


def test_mla_prefill_is_priced_non_absorbed_and_decode_absorbed(cm):
    cfg = deepseek_like()
    h, r, nope, v, rope = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.qk_rope_head_dim
    _, pre = cm.attention_roofline(cfg, prefill(1, 1000))
    up = 2 * 1000 * r * h * (nope + v)  # the context's latents up-projected to keys and values
    assert pre.flops == pytest.approx(1000 * 1001 / 2 * 2 * h * (nope + rope + v) + up)
    _, dec = cm.attention_roofline(cfg, decode(1, 999))
    assert dec.flops == pytest.approx(1000 * 2 * h * (2 * r + rope))


def test_attention_core_runs_at_the_bf16_peak_under_w8a8(cm):
    bf16, int8 = deepseek_like(), deepseek_like(weight_dtype="int8")
    assert cm.attention_roofline(int8, prefill(1, 8192))[1].compute_s == pytest.approx(
        cm.attention_roofline(bf16, prefill(1, 8192))[1].compute_s)
    assert cm.attention_roofline(int8, prefill(1, 8192))[0].compute_s == pytest.approx(
        cm.attention_roofline(bf16, prefill(1, 8192))[0].compute_s / 2)  # projections: the int8 peak


def test_moe_reads_only_touched_experts(cm):
    cfg = deepseek_like()
    one = cm.moe_roofline(cfg, 1, 32)
    many = cm.moe_roofline(cfg, 1000, 32)
    expert_bytes = cfg.expert_params() * 2
    assert one.nbytes == pytest.approx(expert_bytes + 2 * cfg.hidden_size * 2)
    assert many.nbytes - 2000 * cfg.hidden_size * 2 == pytest.approx(32 * expert_bytes)
    assert many.flops == pytest.approx(1000 * 2 * 3 * cfg.hidden_size * cfg.moe_intermediate_size)


def test_all_to_all_crosses_roce_beyond_the_node(cm):
    dev = cm.device  # 910B: 8 per 800I A2 node over HCCS
    assert cm.all_to_all_time(10**9, 1) == 0.0
    small, big = cm.all_to_all_time(10**6, 8), cm.all_to_all_time(10**8, 8)
    assert 0 < small < big
    assert big == pytest.approx(cm.collective_latency_s + 7 / 8 * 10**8 / dev.interconnect_bandwidth)
    spans = cm.all_to_all_time(10**8, 16)  # 8 peers on RoCE: the slower share decides
    assert spans == pytest.approx(cm.collective_latency_s + 8 / 16 * 10**8 / dev.inter_node_bandwidth)
    assert spans > big


def test_a_910c_is_two_dies_each_with_half_the_chip():
    c = CostModel(get_device("910C"))
    cfg = deepseek_like(weight_dtype="int8")
    assert c.dies == 2 and c.peak_flops(cfg) == pytest.approx(get_device("910C").int8_tops * 1e12 / 2)
    halves = split_dies([(100, 1, True, False)] * 9, 2)
    assert sorted(map(len, halves)) == [4, 5]


def test_int8_weights_speed_up_memory_bound_decode(cm):
    bf16, int8 = deepseek_like(), deepseek_like(weight_dtype="int8")
    t16, t8 = cm.step_time(bf16, decode(16, 2048), 16), cm.step_time(int8, decode(16, 2048), 16)
    assert t8.total_s < t16.total_s
    assert t8.moe_s < 0.6 * t16.moe_s  # expert weights halve, experts dominate bytes


def test_amla_uses_its_measured_attention_efficiency(cm):
    soft = deepseek_like(attention_kernel="softmax")
    amla = deepseek_like(attention_kernel="amla")
    a = cm.attention_roofline(soft, prefill(1, 8192))[1]
    b = cm.attention_roofline(amla, prefill(1, 8192))[1]
    assert b.compute_s == pytest.approx(a.compute_s * cm.calibration.attention_efficiency / 0.868)
    custom = CostModel(get_device("910B"), attention_kernels={"amla": 0.05})
    assert custom.attention_roofline(amla, prefill(1, 8192))[1].compute_s > a.compute_s


def test_step_cost_parts_add_up_and_the_overhead_is_per_layer():
    cal = replace(get_device("910B").calibration, layer_overhead_s=100e-6)
    cm = CostModel(get_device("910B"), cal)
    cfg = deepseek_like()
    step = cm.step_time(cfg, decode(64, 1000), ep_dies=32)
    assert isinstance(step, StepCost)
    parts = [step.attention_s, step.moe_s, step.dense_s, step.vector_s, step.all_to_all_s, step.overhead_s,
             step.other_s]
    assert all(p > 0 for p in parts) and step.mtp_s == 0
    assert step.total_s == pytest.approx(sum(parts))
    assert step.overhead_s == pytest.approx(cfg.num_layers * 100e-6)
    proj, core = cm.attention_roofline(cfg, decode(64, 1000))
    assert step.attention_s == pytest.approx(cfg.num_layers * (proj.seconds + core.seconds))
    assert cm.step_time(cfg, decode(64, 1000), ep_dies=1).all_to_all_s == 0.0  # one die: no all-to-all


def test_microbatch_overlap_hides_dispatch_behind_compute():
    cfg = deepseek_like()
    plain = Calibration("plain")
    overlapped = replace(plain, microbatch_overlap=True)
    args = (cfg, decode(64, 4096), 256)
    t0 = CostModel(get_device("910C"), plain).step_time(*args)
    t1 = CostModel(get_device("910C"), overlapped).step_time(*args)
    assert t0.all_to_all_s > 0 and t1.all_to_all_s < t0.all_to_all_s
    assert t1.total_s == pytest.approx(t0.total_s - (t0.all_to_all_s - t1.all_to_all_s))
    int8 = CostModel(get_device("910C"), replace(plain, int8_dispatch=True)).step_time(*args)
    assert int8.all_to_all_s < t0.all_to_all_s  # half the dispatch bytes


def test_the_mtp_layer_is_one_sharded_decoder_layer_over_the_proposing_rows(cm):
    cfg = deepseek_like(num_mtp_layers=1)
    main, rows = DieBatch.of([(1000, 2, True)] * 8), DieBatch.of([(1002, 1, True)] * 8)
    with_mtp = cm.step_time(cfg, main, 32, mtp=rows)
    layer = cm.layer(cfg, rows, 32, True, local_experts=8)
    assert with_mtp.mtp_s == pytest.approx(layer.total + cm.calibration.layer_overhead_s + cm.lm_head_time(cfg, 8))
    assert with_mtp.total_s - with_mtp.mtp_s == pytest.approx(cm.step_time(cfg, main, 32).total_s)


def test_faster_chip_is_faster():
    cfg = deepseek_like()
    b = decode(32, 1024)
    t_b = CostModel(get_device("910B")).step_time(cfg, b, 16).total_s
    t_c = CostModel(get_device("910C")).step_time(cfg, b, 16).total_s
    t_duo = CostModel(get_device("300I Duo")).step_time(cfg, b, 16).total_s
    assert t_c < t_b < t_duo


def test_bad_efficiency_rejected():
    with pytest.raises(ValueError, match="gemm_efficiency"):
        CostModel(get_device("910B"), Calibration("bad", gemm_efficiency=1.5))
