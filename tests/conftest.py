"""Shared fixtures: one local Ray session per test module (Ray start is ~4 s)."""

from __future__ import annotations

import pytest
import ray

from actors.npu import NPU_RESOURCE


@pytest.fixture(scope="module")
def ray_session():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, resources={NPU_RESOURCE: 64}, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention (10x slower on a busy 2-core box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(ray_session):
    """The default manifest's model: (config, weight refs in the object store, reference model)."""
    from actors.model.reference import build_reference
    from actors.model.shared_tensor import fetch_shared
    from cluster.config import load_manifest
    from cluster.launcher import publish_weights

    cfg = load_manifest("local").model
    refs = publish_weights(cfg)
    return cfg, refs, build_reference(cfg, fetch_shared(refs))
