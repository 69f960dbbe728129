"""`omniray bench compare`: the same workload against one OmniRay server per
variant of a proxy setting (routing policy, weighted sorting, tokenizer reuse,
P/D mode), one table side by side.

Every variant gets a freshly deployed cluster (instances, cold local and global
KV caches, master, slaves; Ray Serve itself stays up between them), so no variant
inherits another's cached prefixes; the runs are sequential on the same machine
in one invocation.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from cluster.bench.serve import ServeBenchResult, free_port, local_server, run_serve_bench
from cluster.config import Manifest, ProxySettings, format_validation_error

COLUMNS = (  # (summary key, header, unit scale)
    ("ttft_p50_s", "TTFT p50 ms", 1000), ("ttft_p99_s", "TTFT p99 ms", 1000), ("tpot_p50_s", "TPOT p50 ms", 1000),
    ("e2e_p50_s", "E2E p50 ms", 1000), ("output_tok_per_s", "out tok/s", 1), ("request_per_s", "req/s", 1),
    ("kv_hit_rate", "KV hit rate", 1), ("tokenizer_calls", "tokenizer calls", 1), ("tokenizer_s", "tokenizer ms", 1000),
    ("failed", "failed", 1),
)


@dataclass(frozen=True)
class Variant:
    name: str  # "omni", "weighted_sorting=false", ...
    setting: str
    value: str


def parse_vary(spec: str) -> list[Variant]:
    """`KEY=V1,V2,...` over a proxy setting (e.g. `pd_mode=sequential,parallel`)."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not values.strip():
        raise ValueError(f"--vary: expected KEY=V1,V2,..., got {spec!r}")
    if key not in ProxySettings.model_fields:
        raise ValueError(f"--vary: {key!r} is not a proxy setting; settings: {', '.join(ProxySettings.model_fields)}")
    names = [v.strip() for v in values.split(",") if v.strip()]
    label = (lambda v: v) if key == "policy" else (lambda v: f"{key}={v}")
    return [Variant(label(v), key, v) for v in names]


def variant_manifest(manifest: Manifest, variant: Variant) -> Manifest:
    """The manifest with one proxy setting changed, validated like a manifest field
    (a bad value raises ValueError naming the setting and the value)."""
    try:
        proxy = ProxySettings.model_validate({**manifest.proxy.model_dump(), variant.setting: variant.value})
    except ValidationError as err:
        raise ValueError(f"--vary {variant.setting}={variant.value}: {format_validation_error(err)}") from None
    return manifest.model_copy(update={"proxy": proxy})


def run_compare(manifest: Manifest, variants: list[Variant], items, cfg_for, console=None,
                address: str | None = None) -> dict[str, ServeBenchResult]:
    """`cfg_for(url)`: the load config for a server at url. Variants run in order."""
    from ray import serve

    manifests = [variant_manifest(manifest, v) for v in variants]  # every value checked before any run
    results, port = {}, free_port()
    try:  # one Ray Serve (and port) for all variants; each gets fresh instances, master and slaves
        for v, v_manifest in zip(variants, manifests):
            with local_server(v_manifest, address, port=port, keep_serve=True) as server:
                if console is not None:
                    console.print(f"[bold]{v.name}[/bold]: {len(items)} requests against {server.url}")
                results[v.name] = run_serve_bench(items, cfg_for(server.url), console=console, label=v.name)
    finally:
        serve.shutdown()
    return results


def print_compare(results: dict[str, ServeBenchResult], console, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("variant")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    for name, res in results.items():
        cells = []
        for key, _, scale in COLUMNS:
            value = res.summary.get(key)
            cells.append("-" if value is None else (f"{value * scale:.3g}" if isinstance(value, float) else str(value)))
        table.add_row(name, *cells)
    if not console.is_terminal:  # a pipe or file: rich would squeeze the table into 80 columns
        from rich.console import Console

        console = Console(file=console.file, width=200)
    console.print(table)


def plot_compare(results: dict[str, ServeBenchResult], path: str, title: str) -> None:
    """Bars per variant: TTFT p50/p99, TPOT p50 (ms) and the KV hit rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    x = np.arange(len(names))
    fig, (lat, hit) = plt.subplots(1, 2, figsize=(11, 4))
    keys = (("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99"), ("tpot_p50_s", "TPOT p50"))
    width = 0.8 / len(keys)
    for k, (key, label) in enumerate(keys):
        lat.bar(x + k * width, [(results[n].summary.get(key) or 0) * 1000 for n in names], width, label=label)
    lat.set_xticks(x + width, names, rotation=15)
    lat.set_ylabel("ms")
    lat.legend()
    hit.bar(x, [results[n].summary.get("kv_hit_rate") or 0 for n in names])
    hit.set_xticks(x, names, rotation=15)
    hit.set_ylabel("KV hit rate")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

