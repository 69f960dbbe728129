"""Emulated routing: skewed top-k load, MoGE balanced by construction, the straggler
priced, and Omni Placement's plan taking it away. No Ray."""

from dataclasses import replace

import numpy as np
import pytest

from actors.compute.emulated import EmulatedCompute
from actors.compute.routing_model import pairs_routed, popularity, rank_loads
from actors.cost_model import CostModel
from actors.devices import get_device
from actors.expert_map import ExpertMap
from actors.hbm import HBMLedger
from actors.protocol import NPUBatch, NPUSpec, SeqWork
from cluster.config import load_manifest
from cluster.placement import plan_placement, slots_needed

pytestmark = pytest.mark.ray

DEEPSEEK = load_manifest("deepseek-v3-910c").model
PANGU = load_manifest("pangu-pro-moe-72b").model


def test_popularity_is_a_seeded_distribution_per_layer():
    p = popularity(DEEPSEEK, 3, 0.5)
    assert p.sum() == pytest.approx(1.0) and (p > 0).all()
    assert p.max() / p.mean() > 2  # hot experts
    assert np.array_equal(p, popularity(DEEPSEEK, 3, 0.5)) and not np.array_equal(p, popularity(DEEPSEEK, 4, 0.5))
    assert np.allclose(popularity(DEEPSEEK, 3, 0.0), 1 / DEEPSEEK.num_experts)


def test_moge_takes_one_expert_per_group_so_whole_groups_balance():
    p = popularity(PANGU, 0, 1.0).reshape(PANGU.num_expert_groups, -1)
    assert np.allclose(p.sum(axis=1), 1 / PANGU.num_expert_groups)
    assert p.max() / p.mean() > 2  # skewed within each group
    contiguous = ExpertMap.contiguous(PANGU.moe_layers, PANGU.num_experts, 8)  # one group per NPU
    assert np.allclose(rank_loads(PANGU, contiguous, 1.0), 1.0)


def test_top_k_is_unbalanced_and_omni_placement_evens_it():
    ep = 8
    contiguous = ExpertMap.contiguous(DEEPSEEK.moe_layers, DEEPSEEK.num_experts, ep)
    before = rank_loads(DEEPSEEK, contiguous, 0.5).max()
    assert before > 1.1
    load = {layer: pairs_routed(DEEPSEEK, layer, 10_000, 0.5).round().astype(int).tolist()
            for layer in DEEPSEEK.moe_layers}
    plan = plan_placement(load, ep, slots_needed(DEEPSEEK.num_experts, ep, 2))
    loads = rank_loads(DEEPSEEK, plan, 0.5)
    assert loads.max() < before and loads.max() < 1.05
    assert loads.mean(axis=1) == pytest.approx([1.0] * len(load))  # the pairs are all somewhere


def _npu(rank: int, skew: float, expert_map: ExpertMap) -> EmulatedCompute:
    m = load_manifest("deepseek-v3-910c")
    spec = NPUSpec(f"x.npu{rank}", "x", rank, m.device, "emulated", m.model, expert_map, "g", "gloo",
                   time_scale=0.0, expert_skew=skew)
    device = get_device(m.device)
    return EmulatedCompute(spec, HBMLedger(spec.name, device.hbm_bytes), CostModel(device))


def test_the_most_loaded_npu_is_the_straggler_and_counts_what_its_tokens_routed():
    """In a compute-bound step (a prefill) the NPU holding a layer's hot experts sets
    that layer's time on every NPU (its combine waits for it), and a plan that evens
    the load takes it away. (In memory-bound decode every local expert is read
    whatever its load: there redundant copies cost, and the bench says so.)"""
    ep = 8
    cmap = ExpertMap.contiguous(DEEPSEEK.moe_layers, DEEPSEEK.num_experts, ep)
    batch = NPUBatch(1, [SeqWork(f"s{i}", [7] * 2048, 0) for i in range(4)])
    times = [_npu(r, 0.5, cmap).step(batch).device_time_s for r in range(ep)]
    even = _npu(0, 0.0, cmap).step(batch).device_time_s
    assert times == pytest.approx([times[0]] * ep) and times[0] > 1.02 * even > 0
    npu = _npu(0, 0.5, cmap)
    npu.step(batch)
    load = npu.expert_load()
    assert set(load) == set(DEEPSEEK.moe_layers)
    assert sum(load[DEEPSEEK.moe_layers[0]]) == pytest.approx(4 * 2048 * DEEPSEEK.num_experts_per_tok,
                                                              abs=DEEPSEEK.num_experts)
    plan = plan_placement({k: v for k, v in load.items()}, ep, slots_needed(DEEPSEEK.num_experts, ep, 2))
    npus = [_npu(r, 0.5, cmap) for r in range(ep)]
    for r, n in enumerate(npus):
        n.remap(replace(n.spec, expert_map=plan))
    after = [n.step(batch).device_time_s for n in npus]
    assert max(after) < max(times)  # the step (the slowest NPU) is faster after the remap


def test_bench_placement_on_an_emulated_top_k_model_evens_the_load_and_shortens_the_step(ray_session):
    from cluster.bench.placement import run_placement_bench
    from cluster.config import MANIFEST_DIR, parse_manifest

    manifest = parse_manifest({"name": "skewed", "model": "models/tiny-mla-topk.yaml", "compute": "emulated",
                               "device": "910B", "expert_skew": 1.0, "instances": [{"ep": 4}]}, MANIFEST_DIR)
    s = run_placement_bench(manifest, ep=4, requests=6, max_tokens=2, redundant=[1])
    assert s["layouts"]["contiguous"]["max_imbalance"] > 1.1
    assert s["applied_measured"]["max_imbalance"] < s["layouts"]["contiguous"]["max_imbalance"]
    assert s["step_device_s"]["after"] < s["step_device_s"]["before"]  # the straggler is gone
    assert s["tokens_unchanged"]
