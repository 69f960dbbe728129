"""Emulated compute reports when the host, not the modelled chip, set a step's
length (an overrun), and how long its KV loads took. No Ray."""

from __future__ import annotations

from dataclasses import replace

import pytest

from actors.compute.emulated import EmulatedCompute
from actors.cost_model import CostModel
from actors.devices import get_device
from actors.expert_map import ExpertMap
from actors.hbm import HBMLedger
from actors.protocol import NPUBatch, NPUSpec, SeqWork
from cluster.config import load_manifest

pytestmark = pytest.mark.fast


def _compute(time_scale: float) -> EmulatedCompute:
    m = load_manifest("pangu-pro-moe-72b")
    cfg, device = m.model, get_device(m.device)
    spec = NPUSpec("x.npu0", "x", 0, m.device, "emulated", cfg,
                   ExpertMap.contiguous(cfg.moe_layers, cfg.num_experts, 8), "g", "gloo", time_scale=time_scale)
    compute = EmulatedCompute(spec, HBMLedger(spec.name, device.hbm_bytes), CostModel(device))
    compute.load_weights(None)  # sleeps the modelled copy times time_scale: keep it short
    return compute


def _decode(loads: int = 0) -> NPUBatch:
    """One decode step of two sequences; the first loads `loads` KV blocks first."""
    seqs = [SeqWork(f"s{i}", [7], 64, block_table=list(range(5)),
                    load_blocks=[(b, [None, b]) for b in range(loads if i == 0 else 0)]) for i in range(2)]
    return NPUBatch(1, seqs)


def test_a_step_modelled_shorter_than_the_host_work_is_an_overrun():
    tiny = _compute(1e-9)  # a ~30 ms decode step becomes ~30 ps of wall time: the host's work is longer
    assert tiny.step(_decode()).overrun
    device_s = _compute(0.0).step(_decode()).device_time_s
    slow = _compute(0.0)
    slow.spec = replace(slow.spec, time_scale=0.25 / device_s)  # the step sleeps 0.25 s
    result = slow.step(_decode())
    assert not result.overrun and result.wall_time_s >= 0.25


def test_without_time_nothing_is_timed_so_nothing_overruns():
    assert not _compute(0.0).step(_decode()).overrun


def test_an_npu_with_nothing_to_do_does_not_overrun():
    """A rank of an EP group with no sequence this step models no time of its own (it
    waits for the others, as the chip would): its host work is no overrun, or every
    step in which one rank idles would be flagged the host's."""
    idle = _compute(1.0).step(NPUBatch(1, []))
    assert idle.device_time_s == 0.0 and not idle.overrun


def test_load_time_is_reported_exactly_when_blocks_are_loaded():
    compute = _compute(0.0)
    assert compute.step(_decode()).load_s == 0.0
    assert compute.step(_decode(loads=4)).load_s > 0.0  # the host's time up to the loads, at least
    scaled = _compute(0.0)
    load_device_s = scaled._load_time({"inter_node": 4})
    scaled.spec = replace(scaled.spec, time_scale=2.0)
    result = scaled.step(_decode(loads=4))
    assert load_device_s * 2.0 <= result.load_s <= result.wall_time_s
