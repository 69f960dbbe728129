"""NPU actors: HBM ledger charges in both compute modes, refusal of what does
not fit, and the emulated 718B model starting on this machine."""

from __future__ import annotations

import os
import threading

import pytest

from actors.hbm import HBMOutOfMemory
from actors.model.config import DTYPE_BYTES
from actors.protocol import SeqWork
from cluster.config import load_manifest
from cluster.launcher import launch_instance, publish_weights

pytestmark = pytest.mark.ray


def test_emulated_718b_starts_and_charges_weights_split_over_npus(ray_session):
    m = load_manifest("pangu-ultra-moe-718b")
    cfg, ep = m.model, m.instances[0].ep
    inst = launch_instance("u718", cfg, ep, "emulated", m.device)
    try:
        counts, per_param = cfg.parameter_counts(), DTYPE_BYTES[cfg.weight_dtype]
        assert counts.total > 700e9
        # the routed experts, the MTP layer's too, split over the NPUs; the rest on each
        sharded = counts.routed_experts + cfg.mtp_expert_params()
        replicated = counts.replicated - cfg.mtp_expert_params()
        expert_bytes = [r["by_category"]["weights"] - replicated * per_param for r in inst.memory]
        assert sum(expert_bytes) == sharded * per_param
        assert len(set(expert_bytes)) == 1  # an even split: 256 experts over 16 NPUs
        weights = replicated * per_param + sharded * per_param // ep
        block = 16 * cfg.kv_bytes_per_token()
        for report in inst.memory:
            assert report["by_category"]["weights"] == weights
            assert report["capacity"] == 128 * 2**30
            # the KV pool fills 90% of what the weights leave, in whole blocks
            assert report["by_category"]["kv"] == report["kv_blocks"] * block
            assert report["kv_blocks"] == int((report["capacity"] - weights) * 0.9) // block
        out = inst.executor.step([SeqWork(f"s{i}", list(range(7, 71)), 0) for i in range(8)])
        assert len(out.tokens) == 8 and out.device_time_s > 0
    finally:
        inst.shutdown()


def test_an_emulated_npu_takes_the_modelled_time_to_load_its_weights():
    """Its weights cross the host link into HBM: a joining NPU is not free (no Ray)."""
    from dataclasses import replace

    from actors.compute.emulated import EmulatedCompute
    from actors.cost_model import CostModel
    from actors.devices import get_device
    from actors.expert_map import ExpertMap
    from actors.hbm import HBMLedger
    from actors.protocol import NPUSpec

    m = load_manifest("pangu-pro-moe-72b")
    cfg, device = m.model, get_device(m.device)
    spec = NPUSpec("x.npu0", "x", 0, m.device, "emulated", cfg,
                   ExpertMap.contiguous(cfg.moe_layers, cfg.num_experts, 16), "g", "gloo", time_scale=0.0)
    loads = {}
    for d in (device, replace(device, host_bandwidth=device.host_bandwidth / 4)):
        ledger = HBMLedger(spec.name, d.hbm_bytes)
        compute = EmulatedCompute(spec, ledger, CostModel(d))
        compute.load_weights(None)
        weights = ledger.used_by("weights")
        assert compute.load_s == pytest.approx(weights / d.host_bandwidth, rel=1e-3)
        loads[d.host_bandwidth] = compute.load_s
    assert 0.5 < loads[device.host_bandwidth] < 2.0  # 25 GB of a 72B NPU's share over PCIe
    assert loads[device.host_bandwidth / 4] == pytest.approx(4 * loads[device.host_bandwidth], rel=1e-3)


def test_an_emulated_standby_npu_copies_only_its_experts_when_it_joins():
    """A standby copied the replicated weights into HBM while it waited (as a real
    one builds them): joining copies only its experts; a replica of another model
    does not count, and what an NPU releases is such a replica (no Ray)."""
    from actors.compute.emulated import EmulatedCompute, EmulatedReplica, replicated_bytes
    from actors.cost_model import CostModel
    from actors.devices import get_device
    from actors.expert_map import ExpertMap
    from actors.hbm import HBMLedger
    from actors.protocol import NPUSpec

    m = load_manifest("pangu-pro-moe-72b")
    cfg, device = m.model, get_device(m.device)
    cost = CostModel(device)
    spec = NPUSpec("x.npu0", "x", 0, m.device, "emulated", cfg,
                   ExpertMap.contiguous(cfg.moe_layers, cfg.num_experts, 16), "g", "gloo", time_scale=0.0)
    warm = EmulatedReplica.build(spec, cost)
    assert warm.load_s == pytest.approx(cost.load_time(replicated_bytes(cfg)))
    other = EmulatedReplica(load_manifest("tiny-mla").model, 0.0)

    def joined(replica) -> EmulatedCompute:
        compute = EmulatedCompute(spec, HBMLedger(spec.name, device.hbm_bytes), cost)
        compute.load_weights(None, replica)
        return compute

    cold, adopted = joined(None), joined(warm)
    weights = cold.ledger.used_by("weights")
    assert adopted.ledger.used_by("weights") == weights  # the ledger charges the same weights
    assert cold.load_s == pytest.approx(cost.load_time(weights))
    assert adopted.load_s == pytest.approx(cost.load_time(weights - replicated_bytes(cfg)))
    assert adopted.load_s < cold.load_s / 2  # a 72B NPU's experts at EP 16 are a third of its weights
    assert joined(other).load_s == pytest.approx(cold.load_s)
    assert joined(adopted.release()).load_s == pytest.approx(adopted.load_s)


def test_an_emulated_npu_charges_migrated_kv_to_the_link_it_crosses():
    """KV a scale-in moves between NPUs of one node crosses HCCS, not RoCE: 16x the
    bandwidth on a 910B (the switch's first step is that much shorter). No Ray."""
    from actors.compute.emulated import EmulatedCompute
    from actors.compute.kv_pool import block_bytes
    from actors.cost_model import CostModel
    from actors.devices import get_device
    from actors.expert_map import ExpertMap
    from actors.hbm import HBMLedger
    from actors.protocol import NPUBatch, NPUSpec

    m = load_manifest("pangu-pro-moe-72b")
    cfg, device = m.model, get_device(m.device)
    spec = NPUSpec("x.npu0", "x", 0, m.device, "emulated", cfg,
                   ExpertMap.contiguous(cfg.moe_layers, cfg.num_experts, 8), "g", "gloo", time_scale=0.0)
    compute = EmulatedCompute(spec, HBMLedger(spec.name, device.hbm_bytes), CostModel(device))
    compute.load_weights(None)
    cost = CostModel(device)

    def step(loads: list[tuple[int, bool]]) -> float:  # (blocks, intra-node) per sequence
        seqs = [SeqWork(f"s{i}", [7], 64, block_table=list(range(5)), load_blocks=[(b, [None, b]) for b in range(n)],
                        load_intra_node=intra) for i, (n, intra) in enumerate(loads)]
        return compute.step(NPUBatch(1, seqs)).device_time_s

    base = step([(0, False), (0, True)])
    nbytes = 4 * block_bytes(spec)
    intra, inter = step([(4, True), (0, False)]) - base, step([(0, True), (4, False)]) - base
    assert intra == pytest.approx(cost.transfer_time(nbytes, intra_node=True))
    assert inter == pytest.approx(cost.transfer_time(nbytes, intra_node=False))
    assert inter > 10 * intra
    both = step([(4, True), (4, False)]) - base  # each link charged for its own blocks
    assert both == pytest.approx(intra + inter)
    assert compute.kv_blocks_loaded == {"intra_node": 8, "inter_node": 8}


def test_oversize_load_is_refused_naming_npu_what_and_size(ray_session):
    m = load_manifest("pangu-ultra-moe-718b")
    with pytest.raises(HBMOutOfMemory) as info:
        launch_instance("toosmall", m.model, 2, "emulated", "910B")  # 718B INT8 on 2 x 64 GiB
    msg = str(info.value)
    assert "toosmall.npu" in msg and "weights" in msg and "GiB" in msg


def test_real_npu_charges_kv_per_token_and_frees_it(ray_session):
    m = load_manifest("local")
    cfg = m.model
    inst = launch_instance("kv", cfg, 2, "real", m.device, publish_weights(cfg))
    try:
        before = sum(r["used"] for r in inst.memory)
        pool = sum(r["by_category"]["kv"] for r in inst.memory)
        inst.executor.step([SeqWork("a", [10, 11, 12, 13, 14], 0), SeqWork("b", [20, 21, 22], 0)])
        mem = [s["hbm"] for s in inst.stats()]
        assert sum(r["by_category"]["kv"] for r in mem) - pool == 8 * cfg.kv_bytes_per_token()
        inst.executor.free(["a", "b"])
        assert sum(s["hbm"]["used"] for s in inst.stats()) == before
    finally:
        inst.shutdown()


def test_real_prompt_logprobs_at_ep2_equal_the_reference(ray_session):
    """A prompt prefilled in two chunks (the first's last row predicts next_token)
    on a real EP-2 instance: its prompt logprobs are the reference's."""
    import ray

    from actors.model.reference import build_reference, generate
    from actors.protocol import SamplingParams

    m = load_manifest("local")
    prompt, params = [5, 17, 300, 42, 9, 77, 8, 123, 64, 3, 211], SamplingParams(prompt_logprobs=3, logprobs=1)
    ref = generate(build_reference(m.model), [prompt], 1, params=params)
    inst = launch_instance("plp", m.model, 2, "real", m.device, publish_weights(m.model))
    try:
        got = []
        for works in ([SeqWork("a", prompt[:4], 0, False, params, next_token=prompt[4]), SeqWork("b", [1, 2], 0)],
                      [SeqWork("a", prompt[4:], 4, params=params), SeqWork("b", [3], 2)]):
            results = ray.get(inst.executor.submit(works))
            got += [lp for r in results for lp in r.prompt_logprobs.get("a", [])]
            last = next((r.logprobs["a"] for r in results if "a" in r.logprobs), None)
    finally:
        inst.shutdown()
    assert len(got) == len(prompt) and got[-1] is None
    for mine, want in zip(got[:-1], ref.prompt_logprobs[0][1:]):
        assert (mine.token_id, [t for t, _ in mine.top]) == (want.token_id, [t for t, _ in want.top])
        assert abs(mine.logprob - want.logprob) < 1e-9
    assert last.token_id == ref.tokens[0][0] and abs(last.logprob - ref.logprobs[0][0].logprob) < 1e-9


def test_emulated_tokens_do_not_depend_on_ep_size(ray_session):
    m = load_manifest("pangu-pro-moe-72b")
    prompts = [[7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17, 18]]
    results = []
    for ep in (4, 8):
        inst = launch_instance(f"emu{ep}", m.model, ep, "emulated", m.device, time_scale=0.0)
        try:
            tokens, _, steps = inst.executor.generate(prompts, 6)
        finally:
            inst.shutdown()
        assert all(s.device_time_s > 0 for s in steps)
        results.append(tokens)
    assert results[0] == results[1]
    assert all(len(t) == 6 for t in results[0])


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="per-thread scheduling is Linux's")
def test_loading_runs_below_serving_and_never_above_it():
    """A new NPU loads in a thread below the serving ones: SCHED_IDLE, else the
    lowest niceness. Ray starts workers niced (15); an absolute nice of 10 would
    have put the loading thread above the steps."""
    from actors.npu import _below_serving

    def served_from_a_niced_worker():
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, 15)  # as Ray's workers run
        return _below_serving(lambda: (os.sched_getscheduler(threading.get_native_id()),
                                       os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))

    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", served_from_a_niced_worker()))
    t.start()
    t.join()
    policy, nice = out["v"]
    assert policy == os.SCHED_IDLE or nice == 19
    assert nice >= 15


def test_an_emulated_npu_holds_its_share_of_the_mtp_layers_experts():
    """As the Ascend stacks deploy it, an MTP layer's routed experts are sharded over
    the EP group like a main layer's: EP-16 holds a sixteenth of them, not all. No Ray."""
    from actors.compute.emulated import EmulatedCompute, replicated_bytes
    from actors.cost_model import CostModel
    from actors.devices import get_device
    from actors.expert_map import ExpertMap
    from actors.hbm import HBMLedger
    from actors.protocol import NPUSpec

    cfg = load_manifest("pangu-ultra-moe-718b").model
    assert cfg.num_mtp_layers >= 1
    device = get_device("910C")
    spec = NPUSpec("x.npu0", "x", 0, "910C", "emulated", cfg,
                   ExpertMap.contiguous(cfg.moe_layers, cfg.num_experts, 16), "g", "gloo", time_scale=0.0)
    compute = EmulatedCompute(spec, HBMLedger(spec.name, device.hbm_bytes), CostModel(device))
    compute.load_weights(None)
    expert = cfg.expert_params() * DTYPE_BYTES[cfg.weight_dtype]
    assert compute.ledger.charged("weights", "mtp.experts") == cfg.num_mtp_layers * cfg.num_experts // 16 * expert
    counts = cfg.parameter_counts()
    assert replicated_bytes(cfg) == (counts.replicated - cfg.mtp_expert_params()) * DTYPE_BYTES[cfg.weight_dtype]
    assert compute.ledger.used_by("weights") == (
        replicated_bytes(cfg) + len(cfg.moe_layers) * cfg.num_experts // 16 * expert
        + cfg.num_mtp_layers * cfg.num_experts // 16 * expert)
