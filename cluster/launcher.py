"""Builds what a manifest describes on Ray: the weights in the object store and
the instances (NPU actors joined into an EP group, driven by an executor).

Wiring only: no scheduling decisions here."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor, wait
import uuid
from dataclasses import dataclass, field

import ray

from actors import group_status
from actors.engine.scheduler import SchedulerConfig
from actors.executor import InstanceExecutor
from actors.expert_map import ExpertMap
from actors.model.config import ModelConfig
from actors.npu import NPU_RESOURCE, NPUActor
from actors.protocol import ComputeMode, NPUSpec
from cluster.node_placement import NodePlacement, create_group, remove_group, reserve_groups
from cluster.proxy.tokens import tokenizer_json_text

DEFAULT_LOCAL_NPUS = 64  # omni_npu slots the embedded local Ray offers
# task attempts the embedded local Ray's GCS keeps for the dashboard (Ray's default, 100,000,
# holds ~300 MiB: a soak under load grows the GCS by that much before the buffer is full)
LOCAL_TASK_EVENTS_KEPT = 10_000
PLACEMENT_TIMEOUT_S = 60.0  # how long a launch waits for Ray to place an instance's NPUs
NAMESPACE = "omniray"  # the Ray namespace of a server's named actors, so `omniray status` finds them


def connect(address: str | None = None, num_npus: int = DEFAULT_LOCAL_NPUS, **init_kwargs) -> None:
    """Join a running cluster (address) or start the embedded local one with
    `num_npus` emulated NPU slots. A no-op when Ray is already up."""
    if ray.is_initialized():
        return
    init_kwargs.setdefault("namespace", NAMESPACE)
    if address:
        ray.init(address=address, **init_kwargs)
    else:
        init_kwargs.setdefault("include_dashboard", False)
        init_kwargs.setdefault("log_to_driver", True)
        init_kwargs.setdefault("_system_config", {"task_events_max_num_task_in_gcs": LOCAL_TASK_EVENTS_KEPT})
        ray.init(resources={NPU_RESOURCE: num_npus}, **init_kwargs)


def publish_weights(cfg: ModelConfig, checkpoint: str | None = None) -> dict[str, ray.ObjectRef]:
    """Put every weight tensor into the object store once (one object a tensor,
    as an array: actors.model.shared_tensor), so each NPU fetches only the
    tensors of its shard, and reads them in place."""
    from actors.model.reference import build_reference
    from actors.model.shared_tensor import to_shared
    from actors.model.weights import load_checkpoint

    state = load_checkpoint(checkpoint) if checkpoint else build_reference(cfg).state_dict()
    return {name: ray.put(to_shared(t)) for name, t in state.items()}


@dataclass
class Instance:
    """One copy of the model: EP-N NPU actors and the executor that steps them."""

    name: str
    role: str
    specs: list[NPUSpec]
    npus: list
    executor: InstanceExecutor
    memory: list[dict] = field(default_factory=list)  # HBM report per NPU after load
    placement: NodePlacement | None = None  # the manifest's strategy, which the NPUs a scale-up adds follow too
    # the placement groups it holds (its launch's, with the manifest's strategy, and those a
    # scale-up started NPUs in: cluster.node_placement) and the bundle each of its NPU actors
    # sits in, by actor id. An actor in a bundle dies with its group, so it stays the
    # instance's (serving, or in `reserve`), never the standby pool's; a group goes once
    # none of its bundles holds one (release); a bundle whose actor died takes its successor
    groups: list = field(default_factory=list)
    bundles: dict[str, tuple[object, int]] = field(default_factory=dict)
    # NPUs a scale-down released from their bundles, each with the ref of its recycling (its
    # node): no HBM charged, in no collective group; the first ones a scale-up takes again
    reserve: list[tuple[object, object]] = field(default_factory=list)
    engine: object | None = None  # the InstanceEngine actor, once launched
    # the actor that starts its NPUs, engine and placement groups, and so owns them, so that
    # they outlive the cluster controller that scales it (cluster.keeper); None: the caller
    owner: object | None = None
    kv_cache: object | None = None  # the global KV cache actor it publishes to (held, so it lives as long)
    # the specs its first NPUs served with before its last scale-up: they are still
    # in that collective group and keep the experts it dropped (NPUSpec.retain_dropped),
    # so that a scale-down back to them stages nothing and forms no group (cluster.elastic)
    dormant: list[NPUSpec] | None = None
    # after a scale-down back to `dormant`'s other way round (its previous, larger layout is
    # then `dormant`): the memory reports of the NPUs it released, parked in the standby pool
    # as they were (cluster.elastic.StandbyPool.park), for a scale-up back to adopt
    parked: list[dict] | None = None

    @property
    def ep_size(self) -> int:
        return len(self.npus)

    def stats(self) -> list[dict]:
        return ray.get([n.stats.remote() for n in self.npus])

    def free_bundles(self) -> list[tuple[object, int]]:
        """Bundles of its placement groups that hold none of its actors (theirs died)."""
        used = {(pg.id, i) for pg, i in self.bundles.values()}
        return [(pg, i) for pg in self.groups for i in range(pg.bundle_count) if (pg.id, i) not in used]

    def release(self, npus: list, keep_groups: bool = False) -> None:
        """Forget `npus` (killed or dying) in their bundles, and remove each placement
        group none of whose bundles holds an actor of the instance any more (unless
        `keep_groups`: a rebuild that failed keeps the bundles for its next try)."""
        for n in npus:
            self.bundles.pop(n._actor_id.hex(), None)
        if keep_groups:
            return
        used = {pg.id for pg, _ in self.bundles.values()}
        for pg in [g for g in self.groups if g.id not in used]:
            remove_group(pg)
        self.groups = [g for g in self.groups if g.id in used]

    def shutdown(self) -> None:
        if self.engine is not None:
            ray.kill(self.engine)
        everything = self.npus + [a for a, _ in self.reserve]
        for npu in everything:
            ray.kill(npu)
        self.release(everything)


def launch_instance(
    name: str,
    cfg: ModelConfig,
    ep: int,
    compute: ComputeMode,
    device: str,
    weight_refs: dict | None = None,
    role: str = "mixed",
    expert_map: ExpertMap | None = None,
    backend: str = "gloo",
    time_scale: float = 1.0,
    block_size: int = 16,
    kv_blocks: int | None = None,
    kv_cache_name: str | None = None,
    mtp_acceptance_rate: float = 0.9,
    dies_per_actor: int = 0,
    expert_skew: float = 0.0,
    placement: str | None = None,
    placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
    placement_group=None,
    owner=None,
) -> Instance:
    """Start EP `ep` NPU actors, join them into a fresh collective group and load
    their shards. Raises the NPU's HBMOutOfMemory if a shard does not fit.
    `placement` (STRICT_PACK, PACK, SPREAD, STRICT_SPREAD) places the NPUs with a
    placement group of one omni_npu bundle each (`placement_group`, if reserved already:
    launch_manifest); None schedules them freely. `owner` (cluster.keeper) starts
    the NPUs and the group, and owns them; None: the caller does."""
    expert_map = expert_map or ExpertMap.contiguous(cfg.moe_layers, cfg.num_experts, ep)
    expert_map.validate(cfg.num_experts)
    group = f"{name}-{uuid.uuid4().hex[:8]}"
    specs = [
        NPUSpec(
            f"{name}.npu{r}", name, r, device, compute, cfg, expert_map, group, backend, time_scale,
            block_size=block_size, kv_blocks=kv_blocks, kv_cache_name=kv_cache_name,
            mtp_acceptance_rate=mtp_acceptance_rate, dies_per_actor=dies_per_actor,
            expert_skew=expert_skew,
        )
        for r in range(ep)
    ]
    pg = placement_group
    if pg is None and placement:
        args = (f"{name}-npus", ep, placement, placement_timeout_s)
        pg = ray.get(owner.create_group.remote(*args)) if owner is not None else create_group(*args)
    bundles = [(pg, i) for i in range(ep)] if pg is not None else None
    npus = []
    try:
        npus = start_npu_actors(specs, bundles, owner=owner)
        memory = ray.get([n.setup.remote(weight_refs) for n in npus])
    except Exception:
        for n in npus:
            ray.kill(n)
        if pg is not None:
            remove_group(pg)
        raise
    finally:
        if specs[0].has_group:  # nobody waits on the members' records: setup returned once all joined
            group_status.forget(group)
    return Instance(name, role, specs, npus, InstanceExecutor(npus), memory,
                    placement=NodePlacement(placement, placement_timeout_s) if placement else None,
                    groups=[pg] if pg is not None else [],
                    bundles={n._actor_id.hex(): b for n, b in zip(npus, bundles or [])}, owner=owner)


def start_npu_actors(specs: list[NPUSpec], bundles: list[tuple[object, int]] | None = None,
                     nodes: list[str] | None = None, owner=None, names: list[str] | None = None) -> list:
    """One NPU actor per spec, each taking one omni_npu slot: the i-th in the i-th
    of `bundles` (placement group, bundle index), if given, else on the i-th of
    `nodes` if there is room there (a soft node affinity), else wherever Ray finds room.
    Started by `owner` (cluster.keeper), which then owns them, if given; `names`: theirs."""
    if owner is not None:
        return ray.get(owner.start_npus.remote(specs, bundles, nodes))

    def where(i: int):
        if bundles:
            return _bundle(*bundles[i])
        if not nodes:
            return None
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(nodes[i], soft=True)

    return [
        _npu_actor_class().options(num_cpus=0, resources={NPU_RESOURCE: 1}, scheduling_strategy=where(i),
                                   name=names[i] if names else None).remote(s)
        for i, s in enumerate(specs)
    ]


@functools.cache
def _npu_actor_class():
    """NPUActor as a Ray actor class, made once: a new class is exported to the
    cluster again on its first use (pickled, its methods disassembled), about 40 ms
    of CPU on the path of every scale-up and standby refill."""
    return ray.remote(concurrency_groups={"control": 1})(NPUActor)


@functools.cache
def _engine_actor_class():
    """InstanceEngine as a Ray actor class, made once (see _npu_actor_class)."""
    from actors.engine.instance import InstanceEngine

    return ray.remote(InstanceEngine)


def _bundle(pg, index: int):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def engine_name(instance: str) -> str:
    """The named engine actor of an instance: the master finds engines by name, so
    a restarted master needs only the instance names."""
    return f"omniray.engine.{instance}"


def launch_engine(
    instance: Instance, scheduler: SchedulerConfig | None = None, kv_cache_name: str | None = None, mtp: bool = False,
    tokenizer_json: str | None = None, overlap_steps: bool = True,
):
    """Start the engine actor that drives an instance's NPUs step by step (by the
    instance's owner, if it has one). `tokenizer_json` (the text of a HF
    tokenizer.json): what guided decoding masks by."""
    from actors.engine.instance import EngineConfig

    if mtp and not instance.specs[0].model.num_mtp_layers:
        raise ValueError(f"mtp: model {instance.specs[0].model.name} has no MTP heads (num_mtp_layers: 0)")
    scheduler = scheduler or SchedulerConfig(block_size=instance.specs[0].block_size)
    config = EngineConfig(instance.name, instance.role, scheduler, kv_cache_name, mtp, tokenizer_json,
                          instance.specs[0].model.vocab_size, overlap_steps)
    args = (config, instance.npus, instance.memory, instance.specs)
    owner = instance.owner
    instance.engine = ray.get(owner.start_engine.remote(*args)) if owner is not None else start_engine_actor(*args)
    ray.get(instance.engine.start.remote())
    return instance.engine


def start_engine_actor(config, npus: list, memory: list[dict], specs: list[NPUSpec]):
    """The named engine actor of the instance `config` names (not started yet)."""
    engine = _engine_actor_class().options(name=engine_name(config.name), num_cpus=0, max_concurrency=10_000)
    return engine.remote(config, npus, memory, specs)


def check_capacity(num_npus: int) -> None:
    """Fail fast, naming the resource, when the cluster cannot place `num_npus`
    NPU actors (Ray would otherwise wait for them forever)."""
    have = int(ray.cluster_resources().get(NPU_RESOURCE, 0))
    if have < num_npus:
        raise RuntimeError(
            f"the manifest needs {num_npus} NPU actors but the Ray cluster offers {have} '{NPU_RESOURCE}' slots; "
            f"start Ray with --resources='{{\"{NPU_RESOURCE}\": {num_npus}}}' or use cluster.launcher.connect()"
        )


def launch_manifest(manifest, weight_refs: dict | None = None, owner=None) -> list[Instance]:
    """Everything a manifest describes: the global KV cache, the weights in the
    object store (`weight_refs` if the caller put them already), and each
    instance with its engine (their actors started by `owner`, if given: cluster.keeper)."""
    from actors.kv_cache import get_or_create_kv_cache

    check_capacity(sum(spec.ep for spec in manifest.instances))
    eng = manifest.engine
    # a named actor lives only while someone holds a handle: the instances do
    cache = get_or_create_kv_cache(eng.kv_cache_bytes) if eng.global_kv_cache else None
    refs = weight_refs
    if refs is None and manifest.compute == "real":
        refs = publish_weights(manifest.model, manifest.checkpoint)
    # the nodes first, strictest strategy first: instances started side by side would
    # ask for their placement groups in a race that can leave a STRICT_PACK group no node
    groups = reserve_groups([(s.name, s.ep, s.placement) for s in manifest.instances if s.placement],
                            PLACEMENT_TIMEOUT_S)
    # all at once: an instance's start is mostly its processes starting and importing,
    # which a second instance's overlaps (its engine starts while the next one's NPUs load)
    with ThreadPoolExecutor(max_workers=len(manifest.instances), thread_name_prefix="launch") as pool:
        futures = [pool.submit(launch_manifest_instance, manifest, spec, refs, cache, groups.get(spec.name), owner)
                   for spec in manifest.instances]
        wait(futures)
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        for f in futures:
            if f.exception() is None:
                f.result().shutdown()
        for pg in groups.values():  # the failed instances' (a removed one again is a no-op)
            remove_group(pg)
        raise failed[0]
    return [f.result() for f in futures]


def launch_manifest_instance(manifest, spec, weight_refs: dict | None, kv_cache=None,
                             placement_group=None, owner=None) -> Instance:
    """One instance of a manifest (InstanceSpec `spec`) with its engine, publishing
    to `kv_cache` (the global KV cache actor) if given, its NPUs in
    `placement_group` if reserved already, its actors started by `owner` if given;
    at start-up and when the cluster controller adds one while serving."""
    from actors.kv_cache import KV_CACHE_NAME

    eng = manifest.engine
    cache_name = KV_CACHE_NAME if kv_cache is not None else None
    inst = launch_instance(
        spec.name, manifest.model, spec.ep, manifest.compute, manifest.device, weight_refs, role=spec.role,
        backend=manifest.collective_backend, time_scale=manifest.time_scale, block_size=eng.block_size,
        kv_blocks=eng.kv_blocks, kv_cache_name=cache_name, mtp_acceptance_rate=eng.mtp_acceptance_rate,
        dies_per_actor=spec.dies_per_actor or 0, expert_skew=manifest.expert_skew, placement=spec.placement, placement_group=placement_group, owner=owner,
    )
    inst.kv_cache = kv_cache
    try:
        launch_engine(inst, SchedulerConfig(eng.max_num_seqs, eng.max_num_batched_tokens, eng.block_size),
                      cache_name, eng.mtp, tokenizer_json_text(manifest.tokenizer), eng.overlap_steps)
    except Exception:
        inst.shutdown()
        raise
    return inst
