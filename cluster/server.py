"""Bring a whole OmniRay server up and down: instances and engines, the master,
and the Serve application of the slaves. Used by `omniray serve` and the tests."""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from ray import serve

from cluster.config import Manifest
from cluster.launcher import Instance, engine_name, launch_manifest
from cluster.proxy.master import MASTER_NAME, start_master
from cluster.proxy.sorting import SortingConfig

APP_NAME = "omniray"


@dataclass
class Server:
    manifest: Manifest
    instances: list[Instance]
    master: object
    url: str
    grpc_address: str | None = None

    def shutdown(self, stop_serve: bool = True) -> None:
        """Tear everything down; named actors are gone (their names free) on return."""
        serve.delete(APP_NAME, _blocking=True)
        if stop_serve:
            serve.shutdown()
        from actors.kv_cache import KV_CACHE_NAME

        ray.kill(self.master, no_restart=True)
        caches = {id(i.kv_cache): i.kv_cache for i in self.instances if i.kv_cache is not None}
        for inst in self.instances:
            inst.shutdown()
        for cache in caches.values():  # the next server starts with a cold cache
            ray.kill(cache, no_restart=True)
        _wait_names_free([MASTER_NAME, KV_CACHE_NAME] + [engine_name(i.name) for i in self.instances])


def _wait_names_free(names: list[str], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    for name in names:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name)
            except ValueError:
                break
            time.sleep(0.05)


def start_server(manifest: Manifest, host: str = "127.0.0.1", port: int = 8000, grpc_port: int | None = None) -> Server:
    """Instances, master and slaves of `manifest`, ready to answer on http://host:port
    (and gRPC on host:grpc_port when given)."""
    from ray.serve.config import gRPCOptions

    from cluster.proxy.app import build_app
    from cluster.proxy.grpc_ingress import SERVICER

    instances = launch_manifest(manifest)
    p = manifest.proxy
    sorting = SortingConfig(enabled=p.weighted_sorting, token_weight=p.token_weight, time_weight=p.time_weight,
                            starvation_ms=p.starvation_ms)
    try:
        master = start_master(instances, policy=p.policy, pd_mode=p.pd_mode, sorting=sorting,
                              block_size=manifest.engine.block_size, max_queue=p.max_queue,
                              max_num_seqs=manifest.engine.max_num_seqs)
        grpc = gRPCOptions(port=grpc_port, grpc_servicer_functions=[SERVICER]) if grpc_port else None
        serve.start(http_options={"host": host, "port": port}, grpc_options=grpc)
        namespace = ray.get_runtime_context().namespace
        serve.run(build_app(manifest, namespace), name=APP_NAME, route_prefix="/")
    except Exception:
        for inst in instances:
            inst.shutdown()
        raise
    return Server(manifest, instances, master, f"http://{host}:{port}", f"{host}:{grpc_port}" if grpc_port else None)
