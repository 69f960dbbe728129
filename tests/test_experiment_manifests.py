"""The 72B experiment manifests hold what their comments say (no Ray): the same 8
NPUs, a KV pool that fits the HBM beside the weights and holds the Mooncake
trace's longest request on one NPU, one clock for both."""

from __future__ import annotations

import pytest

from actors.devices import get_device
from actors.model.config import DTYPE_BYTES
from cluster.config import load_manifest

pytestmark = pytest.mark.fast

LONGEST_TRACE_REQUEST = 126_195 + 2_000  # prompt + output tokens, mooncake_conversation_trace.jsonl


@pytest.mark.parametrize("name", ["routing-72b", "pd-72b"])
def test_the_pool_fits_beside_the_weights_and_holds_the_longest_request(name):
    m = load_manifest(name)
    cfg, counts = m.model, m.model.parameter_counts()
    assert cfg.weight_dtype == "int8" and m.compute == "emulated" and m.device == "910B"
    assert sum(i.ep for i in m.instances) == 8 and {i.ep for i in m.instances} == {2}
    weights = (counts.replicated + counts.routed_experts // 2) * DTYPE_BYTES[cfg.weight_dtype]
    pool = m.engine.kv_blocks * m.engine.block_size * cfg.kv_bytes_per_token()
    assert weights + pool <= get_device(m.device).hbm_bytes
    assert m.engine.kv_blocks * m.engine.block_size >= LONGEST_TRACE_REQUEST
    assert m.proxy.max_body_bytes >= 8 * LONGEST_TRACE_REQUEST  # token ids as JSON: up to 8 bytes each
    assert not m.engine.global_kv_cache


def test_the_two_differ_only_in_the_split():
    routing, pd = load_manifest("routing-72b"), load_manifest("pd-72b")
    assert [i.role for i in routing.instances] == ["mixed"] * 4
    assert sorted(i.role for i in pd.instances) == ["decode", "prefill", "prefill", "prefill"]
    assert routing.engine == pd.engine and routing.proxy == pd.proxy and routing.model == pd.model
    assert routing.time_scale == pd.time_scale  # one clock: bench compare runs them side by side
