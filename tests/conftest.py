"""Shared fixtures: a local Ray session that test modules share while each leaves
it as it found it (a Ray start and stop is ~8 s on 2 cores, 16 modules need one)."""

from __future__ import annotations

import os
import time

import pytest
import ray

from actors.npu import NPU_RESOURCE

# the tests' ray.init() (and any `omniray` command a test starts) start their own local
# Ray: without this they would join whatever Ray they find running on the machine
os.environ.setdefault("RAY_ADDRESS", "local")

LOCAL_NPUS = 64  # omni_npu slots of the tests' local Ray
LOCAL_CPUS = 2
CLEAN_WAIT_S = 10.0  # how long a module's leftovers (actors being killed) may take to go


@pytest.fixture(scope="session")
def _local_ray() -> dict:
    """Which local Ray the fixtures started: its driver's namespace (anonymous, one
    per ray.init), so a module reuses only that one, never a Ray some test started
    its own way (a Cluster of several raylets, `connect`)."""
    held = {"namespace": None}
    yield held
    if ray.is_initialized():
        ray.shutdown()


def _left_clean(timeout_s: float = CLEAN_WAIT_S) -> bool:
    """True once no named actor (master, engines, KV cache, Serve's controller),
    no NPU actor and no placement group holds anything: the next module then
    finds the Ray a fresh start would give it, minus the start."""
    deadline = time.monotonic() + timeout_s
    while True:
        free = ray.available_resources()
        if (not ray.util.list_named_actors(all_namespaces=True) and free.get(NPU_RESOURCE, 0) >= LOCAL_NPUS
                and free.get("CPU", 0) >= LOCAL_CPUS):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_session(_local_ray):
    if not (ray.is_initialized() and ray.get_runtime_context().namespace == _local_ray["namespace"]):
        if ray.is_initialized():
            ray.shutdown()
        ray.init(num_cpus=LOCAL_CPUS, resources={NPU_RESOURCE: LOCAL_NPUS}, include_dashboard=False,
                 log_to_driver=False)
        _local_ray["namespace"] = ray.get_runtime_context().namespace
    yield
    if ray.is_initialized() and not _left_clean():  # what it left could change the next module's results
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


TIERS = ("fast", "ray", "serving")


def pytest_collection_modifyitems(config, items):
    """Every test is in one tier, and a `fast` one starts no Ray: a test that is not,
    or a fast one asking for the Ray session, fails to collect (the tiers stay true)."""
    for item in items:
        tiers = [t for t in TIERS if item.get_closest_marker(t)]
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid}: marks tiers {tiers}; a test module marks one of {TIERS} "
                                    "(pytestmark)")
        if tiers == ["fast"] and "ray_session" in item.fixturenames:
            raise pytest.UsageError(f"{item.nodeid}: marked fast but uses the Ray session; mark its module ray")
