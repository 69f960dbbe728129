"""`omniray bench latency`: the latency floor of a served request, against the
floor of Ray Serve itself, measured in one run.

One OmniRay server of the manifest and, on the same Ray Serve (same HTTP proxy,
same port), a bare FastAPI deployment that answers `/v1/completions` with a
fixed completion without doing anything else. Sequential requests, one at a
time: a 1-token completion of a short token-id prompt (greedy) to OmniRay, and
the same body to the echo, interleaved so that drift hits both alike. The
figure is OmniRay's median over the echo's: what the proxy, master, engine and
NPUs add to the least any request through Serve costs on this machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import httpx

ECHO_APP, ECHO_ROUTE = "latency-echo", "/latency-echo"


@dataclass
class LatencyResult:
    manifest: str
    requests: int
    prompt_tokens: int
    omniray_p50_ms: float
    omniray_p90_ms: float
    echo_p50_ms: float
    echo_p90_ms: float

    @property
    def ratio(self) -> float:
        """OmniRay's median over the echo's (lower is better; 1 is Serve's own floor)."""
        return self.omniray_p50_ms / self.echo_p50_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def _echo_app():
    """A Serve app that answers a completion at once: Serve's HTTP proxy, a replica, FastAPI and JSON, nothing else."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Echo:
        @api.post("/v1/completions")
        async def complete(self, body: dict) -> dict:
            return {"id": "echo", "object": "text_completion", "model": body.get("model"),
                    "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}}

    return Echo.bind()


def _ms(samples: list[float], q: float) -> float:
    """The q-quantile (0.5 or 0.9) of `samples` in ms."""
    if q == 0.5 or len(samples) < 2:
        return 1000 * statistics.median(samples)
    return 1000 * statistics.quantiles(samples, n=10)[round(q * 10) - 1]


def run_latency_bench(manifest, requests: int = 100, prompt_tokens: int = 4, warmup: int = 5,
                      address: str | None = None, url: str | None = None) -> LatencyResult:
    """`url`: an OmniRay server of `manifest` already up on this Ray's Serve (the
    echo joins its Serve); None: one started for the run and stopped after."""
    from contextlib import nullcontext

    from ray import serve

    from cluster.bench.serve import local_server

    prompt = list(range(16, 16 + prompt_tokens))
    body = {"model": manifest.model.name, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
    with (nullcontext() if url else local_server(manifest, address)) as server:
        serve.run(_echo_app(), name=ECHO_APP, route_prefix=ECHO_ROUTE)
        omni, echo = [], []
        try:
            with httpx.Client(base_url=url or server.url, timeout=60.0) as client:
                for i in range(warmup + requests):
                    for path, out in (("/v1/completions", omni), (f"{ECHO_ROUTE}/v1/completions", echo)):
                        t0 = time.perf_counter()
                        resp = client.post(path, json=body)
                        elapsed = time.perf_counter() - t0
                        if resp.status_code != 200:
                            raise RuntimeError(f"bench latency: {path} answered {resp.status_code}: {resp.text[:200]}")
                        if i >= warmup:
                            out.append(elapsed)
        finally:
            serve.delete(ECHO_APP, _blocking=True)
    return LatencyResult(manifest.name, requests, prompt_tokens, _ms(omni, 0.5), _ms(omni, 0.9), _ms(echo, 0.5),
                         _ms(echo, 0.9))


def print_latency(r: LatencyResult, console) -> None:
    from rich.table import Table

    table = Table(title=f"omniray bench latency — {r.manifest}: {r.requests} sequential 1-token completions of a "
                        f"{r.prompt_tokens}-token prompt, against a bare Ray Serve echo on the same Serve")
    for col in ("server", "p50 ms", "p90 ms", "p50 vs echo"):
        table.add_column(col, justify="right")
    table.add_row("omniray", f"{r.omniray_p50_ms:.1f}", f"{r.omniray_p90_ms:.1f}", f"{r.ratio:.2f}x")
    table.add_row("Serve echo", f"{r.echo_p50_ms:.1f}", f"{r.echo_p90_ms:.1f}", "1.00x")
    console.print(table)
