"""Bring a whole OmniRay server up and down: instances and engines, the master,
and the Serve application of the slaves. Used by `omniray serve` and the tests."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray
from ray import serve

from cluster.config import Manifest
from cluster.controller import CONTROLLER_NAME, create_controller
from cluster.keeper import create_keeper
from cluster.launcher import Instance, engine_name, launch_manifest, publish_weights
from cluster.proxy.budgets import Budgets
from cluster.proxy.master import MASTER_NAME, create_master
from cluster.proxy.routing import routing_config
from cluster.proxy.sorting import SortingConfig

logger = logging.getLogger(__name__)

APP_NAME = "omniray"


@dataclass
class Server:
    manifest: Manifest
    instances: list[Instance]
    master: object
    url: str
    grpc_address: str | None = None
    controller: object | None = None  # owns the instances once serving (scaling adds and removes some)
    keeper: object | None = None  # started the NPU and engine actors, and owns them (cluster.keeper)
    stage: str = "serving"  # what shutdown is doing (`omniray serve` names it if that takes too long)

    def shutdown(self, stop_serve: bool = True) -> None:
        """Tear everything down; named actors are gone (their names free) on return."""
        if stop_serve:  # deletes the application too, without delete's 3 s of polling
            self.stage = "stopping Ray Serve"
            serve.shutdown()
        else:
            self.stage = "deleting the Serve application"
            serve.delete(APP_NAME, _blocking=True)
        from actors.kv_cache import KV_CACHE_NAME

        self.stage = "stopping the master, the controller and the instances"
        ray.kill(self.master, no_restart=True)
        caches = {id(i.kv_cache): i.kv_cache for i in self.instances if i.kv_cache is not None}
        names = [i.name for i in self.instances]
        actors = ray.get(self.keeper.names.remote()) if self.keeper is not None else []
        if self.controller is not None:
            try:
                names += [i["name"] for i in ray.get(self.controller.describe.remote())["instances"]]
                ray.get(self.controller.shutdown.remote())
            except ray.exceptions.RayActorError:  # it died for good: the keeper's end takes what it started
                logger.warning("the cluster controller had died; stopping what the server started itself")
            ray.kill(self.controller, no_restart=True)
        for inst in self.instances:
            inst.shutdown()
        if self.keeper is not None:  # whatever it still holds (and its placement groups) ends with it
            ray.kill(self.keeper, no_restart=True)
        for cache in caches.values():  # the next server starts with a cold cache
            ray.kill(cache, no_restart=True)
        self.stage = "waiting for the named actors to go"
        wait_names_free([MASTER_NAME, KV_CACHE_NAME, CONTROLLER_NAME] + [engine_name(n) for n in set(names)] + actors)


def wait_names_free(names: list[str], timeout_s: float = 10.0) -> None:
    """Wait, up to `timeout_s` in all, until no actor holds any of `names` (a killed
    actor's name is freed a little after its death); the caller checks if it matters."""
    deadline = time.monotonic() + timeout_s
    for name in names:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name)
            except ValueError:
                break
            time.sleep(0.05)


def launch_backend(manifest: Manifest) -> tuple[list[Instance], object, object, object]:
    """Everything behind the slaves: instances (NPU actors, engines, KV cache), the
    master, the cluster controller that scales them while serving, and the keeper
    that starts (and owns) their NPU and engine actors, then and while serving."""
    refs = publish_weights(manifest.model, manifest.checkpoint) if manifest.compute == "real" else None
    keeper = create_keeper()
    try:
        instances = launch_manifest(manifest, refs, owner=keeper)
    except Exception:
        ray.kill(keeper)
        raise
    p = manifest.proxy
    sorting = SortingConfig(enabled=p.weighted_sorting, token_weight=p.token_weight, time_weight=p.time_weight,
                            starvation_ms=p.starvation_ms, decode_max_tokens_weight=p.decode_max_tokens_weight,
                            time_scale=manifest.time_scale if manifest.compute == "emulated" and manifest.time_scale else 1.0)
    budgets = Budgets(p.max_batch_num_token, p.prefill_max_num_seqs, p.decode_max_num_seqs)
    # the master and the controller come up side by side (each is a new worker process)
    started = []
    try:
        master, master_ready = create_master(instances, policy=p.policy, pd_mode=p.pd_mode, sorting=sorting,
                                             routing=routing_config(p), budgets=budgets,
                                             block_size=manifest.engine.block_size, max_queue=p.max_queue,
                                             global_cache=manifest.engine.global_kv_cache)
        started.append(master)
        controller, controller_ready = create_controller(manifest, instances, refs, instances[0].kv_cache, keeper)
        started.append(controller)
        ray.get([master_ready, controller_ready])
    except Exception:
        for actor in started:
            ray.kill(actor, no_restart=True)
        for inst in instances:
            inst.shutdown()
        ray.kill(keeper)
        raise
    return instances, master, controller, keeper


def start_server(manifest: Manifest, host: str = "127.0.0.1", port: int = 8000, grpc_port: int | None = None) -> Server:
    """Instances, master and slaves of `manifest`, ready to answer on http://host:port
    (and gRPC on host:grpc_port when given)."""
    from ray.serve.config import gRPCOptions

    from cluster.proxy.app import build_app
    from cluster.proxy.grpc_ingress import SERVICER

    grpc = gRPCOptions(port=grpc_port, grpc_servicer_functions=[SERVICER]) if grpc_port else None
    # Serve's controller and HTTP proxy start while the backend launches (a third of a
    # small server's start-up, mostly processes starting); one HTTP proxy, on the head
    # node: the simulated multi-node clusters of the tests share one machine (and one
    # port); put a load balancer before EveryNode proxies instead
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="serve-start") as pool:  # leaving it waits
        serve_started = pool.submit(serve.start, proxy_location="HeadOnly",
                                    http_options={"host": host, "port": port}, grpc_options=grpc)
        instances, master, controller, keeper = launch_backend(manifest)
    try:
        serve_started.result()
        namespace = ray.get_runtime_context().namespace
        serve.run(build_app(manifest, namespace), name=APP_NAME, route_prefix="/")
    except Exception:
        ray.kill(master, no_restart=True)
        ray.get(controller.shutdown.remote())
        ray.kill(controller, no_restart=True)
        for inst in instances:
            inst.shutdown()
        ray.kill(keeper)
        raise
    return Server(manifest, instances, master, f"http://{host}:{port}", f"{host}:{grpc_port}" if grpc_port else None,
                  controller, keeper)


# ---- `serve run` / `serve deploy` / KubeRay RayService ------------------------------------------

OWNER_NAMESPACE = "omniray"


class BackendOwner:
    """A detached actor that launches and holds a manifest's backend, for Serve
    applications built from a config file: Serve runs the builder in a task whose
    worker exits, and actors it created would die with it. Killing the owner tears
    the backend down (its actors are owned by it)."""

    def __init__(self, manifest: Manifest):
        self.instances, self.master, self.controller, self.keeper = launch_backend(manifest)

    def namespace(self) -> str:
        """Where the master and engines are named (the slaves look them up there)."""
        return ray.get_runtime_context().namespace

    def instance_names(self) -> list[str]:
        return [i.name for i in self.instances]


def owner_name(manifest: Manifest) -> str:
    return f"omniray.owner.{manifest.name}"


def app_from_args(args: dict):
    """Serve application builder (`import_path: cluster.server:app_from_args`):
    args `manifest` (a shipped name or a path; default `local`) and optional
    `api_key`, or `api_key_env`: the environment variable that holds the key
    where the application is built (the shipped configs: OMNIRAY_API_KEY),
    unset or empty is an error. The backend is started once, by a detached
    owner actor, and reused by later deploys of the same manifest name."""
    import os

    from cluster.config import load_manifest
    from cluster.launcher import check_capacity
    from cluster.proxy.app import build_app

    unknown = set(args) - {"manifest", "api_key", "api_key_env"}
    if unknown:
        raise ValueError(f"args: unknown keys {sorted(unknown)}; expected manifest, api_key, api_key_env")
    manifest = load_manifest(args.get("manifest", "local"))
    if args.get("api_key"):
        manifest.proxy.api_keys = [str(args["api_key"])]
    if args.get("api_key_env"):
        name = str(args["api_key_env"])
        key = os.environ.get(name)
        if not key:
            raise ValueError(f"args.api_key_env: the environment variable {name} (the API key) is not set where "
                             f"Serve builds the application; set {name} on every Ray node (KubeRay: the container's "
                             "env from a Secret, valueFrom.secretKeyRef), or leave api_key_env out to serve "
                             "without a key")
        manifest.proxy.api_keys = [key]
    check_capacity(sum(s.ep for s in manifest.instances))
    owner = ray.remote(BackendOwner).options(
        name=owner_name(manifest), namespace=OWNER_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
    ).remote(manifest)
    return build_app(manifest, ray.get(owner.namespace.remote()))
