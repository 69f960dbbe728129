"""Bring a whole OmniRay server up and down: instances and engines, the master,
and the Serve application of the slaves. Used by `omniray serve` and the tests."""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray import serve

from cluster.config import Manifest
from cluster.launcher import Instance, launch_manifest
from cluster.proxy.master import start_master
from cluster.proxy.sorting import SortingConfig

APP_NAME = "omniray"


@dataclass
class Server:
    manifest: Manifest
    instances: list[Instance]
    master: object
    url: str

    def shutdown(self) -> None:
        serve.delete(APP_NAME, _blocking=True)
        ray.kill(self.master)
        for inst in self.instances:
            inst.shutdown()


def start_server(manifest: Manifest, host: str = "127.0.0.1", port: int = 8000) -> Server:
    from cluster.proxy.app import build_app

    instances = launch_manifest(manifest)
    p = manifest.proxy
    sorting = SortingConfig(enabled=p.weighted_sorting, token_weight=p.token_weight, time_weight=p.time_weight,
                            starvation_ms=p.starvation_ms)
    master = start_master(instances, policy=p.policy, pd_mode=p.pd_mode, sorting=sorting,
                          block_size=manifest.engine.block_size, max_queue=p.max_queue,
                          max_num_seqs=manifest.engine.max_num_seqs)
    ray.get(master.refresh.remote())
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(manifest), name=APP_NAME, route_prefix="/")
    return Server(manifest, instances, master, f"http://{host}:{port}")
