"""Multi-node: a 3-node Ray cluster simulated on this machine with
`ray.cluster_utils.Cluster` (three raylets, two `omni_npu` slots each).
Placement groups put each instance's NPUs where the manifest says, and a
request prefilled on one node is decoded on another from the KV it left in the
object store, with the reference's tokens."""

from __future__ import annotations

import time

import httpx
import pytest
import ray
from ray.cluster_utils import Cluster

from actors.model.reference import build_reference, generate
from actors.npu import NPU_RESOURCE
from cluster.bench.serve import free_port
from cluster.config import MANIFEST_DIR, parse_manifest
from cluster.proxy.tokens import Tokenizer
from helpers import generate_during

pytestmark = pytest.mark.serving


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {NPU_RESOURCE: 2}})
    for _ in range(2):
        c.add_node(num_cpus=1, resources={NPU_RESOURCE: 2})
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def test_instances_span_nodes_and_pd_crosses_them(cluster):
    from cluster.server import start_server

    manifest = parse_manifest({
        "model": "models/tiny-gqa-moge.yaml", "compute": "real",
        "instances": [{"name": "prefill0", "role": "prefill", "ep": 2, "placement": "STRICT_PACK"},
                      {"name": "prefill1", "role": "prefill", "ep": 2, "placement": "SPREAD"},
                      {"name": "decode0", "role": "decode", "ep": 2, "placement": "SPREAD"}],
        "proxy": {"policy": "round_robin"},
    }, MANIFEST_DIR)
    server = start_server(manifest, port=free_port())
    try:
        nodes = {i.name: [n["node"] for n in ray.get([npu.stats.remote() for npu in i.npus])]
                 for i in server.instances}
        assert len(set(nodes["prefill0"])) == 1  # STRICT_PACK: one node
        assert len(set(nodes["decode0"])) == 2 and len(set(nodes["prefill1"])) == 2  # SPREAD: two nodes
        assert len({n for ns in nodes.values() for n in ns}) == 3  # NPUs on every node
        tok = Tokenizer.from_file()
        reference = build_reference(manifest.model)
        routes = set()
        for prompt in ("Experts on three nodes", "The KV cache crosses nodes", "Prefill here, decode there"):
            want = tok.decode(generate(reference, [tok.encode(prompt)], 6, stop_token_ids={tok.eos_token_id}).tokens[0])
            body = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
                "model": "tiny-gqa-moge", "prompt": prompt, "max_tokens": 6, "temperature": 0, "debug": True}).json()
            assert body["choices"][0]["text"] == want
            routes.add(body["debug"]["route"]["prefill"])
        # prefill0's node holds no decode NPU: its requests' KV was read on other nodes
        assert "prefill0" in routes and not set(nodes["prefill0"]) & set(nodes["decode0"])
    finally:
        server.shutdown()


def test_a_launch_reserves_strict_groups_before_soft_ones(cluster):
    """Listed soft-first, two SPREAD pairs could take one slot of every node and leave
    the STRICT_PACK pair no node: a launch asks for the strict group first."""
    from cluster.node_placement import remove_group, reserve_groups

    _wait_free(6)  # the first test's NPUs are gone
    groups = reserve_groups([("soft0", 2, "SPREAD"), ("soft1", 2, "SPREAD"), ("strict", 2, "STRICT_PACK")], 5)
    try:
        table = {name: ray.util.placement_group_table(pg) for name, pg in groups.items()}
        assert len(set(table["strict"]["bundles_to_node_id"].values())) == 1
        assert all(t["state"] == "CREATED" for t in table.values())
    finally:
        for pg in groups.values():
            remove_group(pg)


def test_strict_pack_that_no_node_can_hold_fails_clearly(cluster):
    from cluster.launcher import launch_instance

    manifest = parse_manifest({"model": "models/tiny-gqa-moge.yaml"}, MANIFEST_DIR)
    with pytest.raises(RuntimeError, match="STRICT_PACK"):
        launch_instance("toowide", manifest.model, 4, "emulated", "910B", placement="STRICT_PACK",
                        placement_timeout_s=3)


def _nodes(inst) -> list[str]:
    return [m["node"] for m in inst.memory]


def _wait_free(slots: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get(NPU_RESOURCE, 0) < slots:
        assert time.monotonic() < deadline, f"{slots} {NPU_RESOURCE} slots never came free"
        time.sleep(0.1)


def _live_groups(prefix: str) -> list[str]:
    from ray.util import placement_group_table

    return [g["name"] for g in placement_group_table().values()
            if g["name"].startswith(prefix) and g["state"] != "REMOVED"]


def test_a_scale_up_keeps_the_instance_placement(cluster):
    """The NPUs a scale-up adds follow the instance's strategy: STRICT_PACK on its
    node (and a clear error, the instance unharmed, when that node is full),
    SPREAD on nodes it does not use; scaling back removes their placement group;
    PACK falls back to other nodes when the instance's is full."""
    from cluster.elastic import resize
    from cluster.launcher import launch_engine, launch_instance
    from cluster.node_placement import PlacementError

    manifest = parse_manifest({"model": "models/tiny-gqa-moge.yaml"}, MANIFEST_DIR)
    _wait_free(6)  # the earlier tests' NPUs are gone
    packed = launch_instance("packed", manifest.model, 1, "emulated", "910B", placement="STRICT_PACK",
                             placement_timeout_s=3)
    spread = launch_instance("spread", manifest.model, 1, "emulated", "910B", placement="SPREAD")
    instances = [packed, spread]
    try:
        for inst in (packed, spread):
            launch_engine(inst)
        resize(packed, 2, None)
        assert len(set(_nodes(packed))) == 1 and len(_live_groups("packed-npus-")) == 1
        with pytest.raises(PlacementError, match="STRICT_PACK"):  # 4 on one node: every node has 2 slots
            resize(packed, 4, None)
        assert packed.ep_size == 2 and len(_live_groups("packed-npus-")) == 1  # the failed group was removed

        resize(spread, 2, None)
        assert len(set(_nodes(spread))) == 2
        resize(spread, 1, None)
        resize(packed, 1, None)
        assert _live_groups("packed-npus-") == [] and _live_groups("spread-npus-") == []

        # PACK whose node is full: not an error, the added NPUs go where Ray finds room
        _wait_free(4)  # the NPUs scaled away have given their slots back (killing an actor is asynchronous)
        full = launch_instance("full", manifest.model, 2, "emulated", "910B", placement="PACK")
        instances.append(full)
        launch_engine(full)
        assert len(set(_nodes(full))) == 1  # both on one node, whose two slots they take
        resize(full, 4, None)
        assert full.ep_size == 4 and len(set(_nodes(full))) >= 2 and len(_live_groups("full-npus-")) == 1
    finally:
        for inst in instances:
            inst.shutdown()


def test_standby_npus_wait_on_the_instances_nodes_and_a_strict_scale_up_takes_them(cluster):
    from cluster.elastic import StandbyPool, resize
    from cluster.launcher import launch_engine, launch_instance

    manifest = parse_manifest({"model": "models/tiny-gqa-moge.yaml"}, MANIFEST_DIR)
    _wait_free(6)
    inst = launch_instance("pooled", manifest.model, 1, "emulated", "910B", placement="STRICT_PACK",
                           placement_timeout_s=3)
    pool = None
    try:
        launch_engine(inst)
        home, head = _nodes(inst)[0], ray.get_runtime_context().get_node_id()
        other = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in (home, head))
        pool = StandbyPool(inst.specs[0], 2, None, nodes=[other])
        assert ray.get(list(pool.node_refs.values())) == [other, other]
        resize(inst, 2, None, standby=pool)  # STRICT_PACK takes neither: they wait on another node
        assert len(pool.actors) == 2 and len(set(_nodes(inst))) == 1 and len(_live_groups("pooled-npus-")) == 1
        resize(inst, 1, None, standby=pool)
        assert len(pool.actors) == 2 and _live_groups("pooled-npus-") == []
        pool.shutdown()
        _wait_free(5)

        pool = StandbyPool(inst.specs[0], 1, None, nodes=_nodes(inst))
        assert ray.get(list(pool.node_refs.values())) == _nodes(inst)  # waiting on the instance's node
        standby = pool.actors[0]
        resize(inst, 2, None, standby=pool)
        assert inst.npus[1] is standby and len(set(_nodes(inst))) == 1
        assert _live_groups("pooled-npus-") == []  # nothing started: no group of its own
        resize(inst, 1, None, standby=pool)
        assert pool.actors == [standby]  # back to standby
    finally:
        inst.shutdown()
        if pool is not None:
            pool.shutdown()


def test_the_standby_pool_follows_the_instances_as_they_are_added_and_removed(cluster):
    """New standby NPUs start on the instances' home nodes (StandbyPool.nodes): the
    controller's view of them follows an instance added on another node, and its
    removal."""
    from cluster.server import start_server

    _wait_free(6)
    manifest = parse_manifest({
        "model": "models/tiny-gqa-moge.yaml", "compute": "emulated",
        "instances": [{"name": "mixed0", "role": "mixed", "ep": 1, "placement": "STRICT_PACK"}],
        "elastic": {"standby_npus": 1},
    }, MANIFEST_DIR)
    server = start_server(manifest, port=free_port())
    try:
        def view() -> dict:
            return ray.get(server.controller.describe.remote())

        home = _nodes(server.instances[0])[0]
        assert view()["standby_nodes"] == [home]
        ray.get(server.controller.add_instance.remote("mixed", 1), timeout=120)
        added = next(i for i in view()["instances"] if i["name"] != "mixed0")
        # its node: the first holds mixed0's NPU and the standby NPU waiting beside it, its two slots
        nodes = view()["standby_nodes"]
        assert len(nodes) == 2 and nodes[0] == home and nodes[1] != home
        ray.get(server.controller.remove_instance.remote(added["name"]), timeout=120)
        assert view()["standby_nodes"] == [home]
    finally:
        server.shutdown()


def test_a_spread_scale_up_takes_a_standby_npu_on_another_node_and_keeps_the_tokens(cluster):
    """Real compute across nodes: a SPREAD instance scales up onto the standby NPU
    waiting on another node (no process started, no placement group of its own),
    its EP group spans the two nodes, and it serves the reference's tokens; a
    scale-down gives that NPU back to the pool."""
    from actors.model.shared_tensor import fetch_shared
    from cluster.elastic import StandbyPool, resize
    from cluster.launcher import launch_engine, launch_instance, publish_weights

    cfg = parse_manifest({"model": "models/tiny-gqa-moge.yaml"}, MANIFEST_DIR).model
    refs = publish_weights(cfg)
    reference = build_reference(cfg, fetch_shared(refs))
    _wait_free(6)
    inst = launch_instance("cross", cfg, 1, "real", "910B", refs, placement="SPREAD", time_scale=0.0)
    pool = None
    try:
        launch_engine(inst)
        home = _nodes(inst)[0]
        other = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != home)
        pool = StandbyPool(inst.specs[0], 1, refs, nodes=[other])
        standby = pool.actors[0]
        assert ray.get(pool.node_refs[standby._actor_id.hex()]) == other
        prompt = [11, 42, 7, 300, 5, 99, 23, 8, 61, 17, 250, 3, 77, 140, 9, 31, 2, 88]
        want = generate(reference, [prompt], 8).tokens[0]
        assert generate_during(inst, [prompt], 8, lambda: None)[0][0] == want  # EP 1 on one node

        resize(inst, 2, refs, standby=pool)
        assert inst.npus[1] is standby and _nodes(inst) == [home, other]
        assert _live_groups("cross-npus-") == []  # nothing started: no group of its own
        assert [s["groups"] for s in inst.stats()] == [[inst.specs[0].group_name]] * 2  # one EP group, two nodes
        assert generate_during(inst, [prompt], 8, lambda: None)[0][0] == want

        resize(inst, 1, refs, standby=pool)
        assert pool.actors == [standby] and _nodes(inst) == [home]
        assert generate_during(inst, [prompt], 8, lambda: None)[0][0] == want
    finally:
        inst.shutdown()
        if pool is not None:
            pool.shutdown()
