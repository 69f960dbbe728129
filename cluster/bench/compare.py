"""`omniray bench compare`: the same workload against one OmniRay server per
variant of a proxy setting (routing policy, weighted sorting, tokenizer reuse,
P/D mode), or per manifest with its own settings (`--variants`), one table side
by side.

Every variant gets a freshly deployed cluster (instances, cold local and global
KV caches, master, slaves; Ray Serve itself stays up between them), so no variant
inherits another's cached prefixes; the runs are sequential on the same machine
in one invocation.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from cluster.bench.clock import Clock, with_clock
from cluster.bench.serve import ServeBenchResult, free_port, local_server, run_serve_bench
from cluster.config import Manifest, ProxySettings, format_validation_error, load_manifest

COLUMNS = (  # (summary key, header, unit scale)
    ("ttft_p50_s", "TTFT p50 ms", 1000), ("ttft_p99_s", "TTFT p99 ms", 1000),
    ("ttft_p50_short_third_s", "TTFT p50 short1/3 ms", 1000), ("tpot_p50_s", "TPOT p50 ms", 1000),
    ("e2e_p50_s", "E2E p50 ms", 1000), ("max_queue_wait_s", "max queue wait ms", 1000),
    ("output_tok_per_s", "out tok/s", 1), ("request_per_s", "req/s", 1),
    ("kv_hit_rate", "KV hit rate", 1), ("ideal_kv_hit_rate", "ideal hit rate", 1),
    ("kv_hit_fraction_of_ideal", "hit/ideal", 1), ("preemptions", "preempt", 1),
    ("emulation_overrun_fraction", "overrun", 1), ("emulation_host_gap_fraction", "host gap", 1),
    ("tokenizer_calls", "tokenizer calls", 1), ("tokenizer_s", "tokenizer ms", 1000), ("failed", "failed", 1),
)
SLO_COLUMNS = (("goodput_req_per_s", "goodput req/s", 1), ("slo_attainment", "SLO met", 1))


@dataclass(frozen=True)
class Variant:
    name: str  # "omni", "weighted_sorting=false", "pd-72b:pd_mode=parallel", ...
    settings: tuple[tuple[str, str], ...]  # proxy settings changed, as given
    manifest: str | None = None  # --variants: its own manifest; None: the one of --manifest

    @property
    def option(self) -> str:
        """How the variant was asked for, for errors: `--vary K=V` or `--variants SPEC`."""
        if self.manifest is None:
            return "--vary " + ",".join(f"{k}={v}" for k, v in self.settings)
        return f"--variants {self.name}"


def _setting(option: str, key: str) -> str:
    """`key`, checked to be a proxy setting (else ValueError naming the option)."""
    key = key.strip()
    if key not in ProxySettings.model_fields:
        raise ValueError(f"{option}: {key!r} is not a proxy setting; settings: {', '.join(ProxySettings.model_fields)}")
    return key


def parse_vary(spec: str) -> list[Variant]:
    """`KEY=V1,V2,...` over a proxy setting (e.g. `pd_mode=sequential,parallel`)."""
    key, sep, values = spec.partition("=")
    if not sep or not values.strip() or not key.strip():
        raise ValueError(f"--vary: expected KEY=V1,V2,..., got {spec!r}")
    key = _setting("--vary", key)
    names = [v.strip() for v in values.split(",") if v.strip()]
    label = (lambda v: v) if key == "policy" else (lambda v: f"{key}={v}")
    return [Variant(label(v), ((key, v),)) for v in names]


def parse_variants(text: str) -> list[Variant]:
    """`SPEC[;SPEC...]`, each `MANIFEST[:KEY=VALUE[:KEY=VALUE...]]`: a server of its own
    manifest per variant, with those proxy settings; the variant is named by its spec."""
    specs = [s.strip() for s in text.split(";")]
    if not text.strip() or any(not s for s in specs):
        raise ValueError(f"--variants: expected MANIFEST[:KEY=VALUE...][;...], got an empty variant in {text!r}")
    variants = []
    for spec in specs:
        manifest, *pairs = [p.strip() for p in spec.split(":")]
        if not manifest:
            raise ValueError(f"--variants {spec}: no manifest before ':'")
        settings = []
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ValueError(f"--variants {spec}: expected KEY=VALUE, got {pair!r}")
            settings.append((_setting(f"--variants {spec}", key), value.strip()))
        variants.append(Variant(spec, tuple(settings), manifest))
    if len({v.name for v in variants}) < len(variants):
        raise ValueError(f"--variants: a variant is given twice in {text!r}")
    return variants


def variant_manifest(manifest: Manifest, variant: Variant) -> Manifest:
    """The manifest (the variant's own, if it names one) with its proxy settings
    changed, validated like manifest fields (a bad value raises ValueError naming the
    variant, the setting and the value)."""
    if variant.manifest is not None:
        try:
            manifest = load_manifest(variant.manifest)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"{variant.option}: {err}") from None
    try:
        proxy = ProxySettings.model_validate({**manifest.proxy.model_dump(), **dict(variant.settings)})
    except ValidationError as err:
        raise ValueError(f"{variant.option}: {format_validation_error(err)}") from None
    return manifest.model_copy(update={"proxy": proxy})


def plan_variants(manifest: Manifest, variants: list[Variant]) -> list[tuple[Variant, Manifest]]:
    """Every variant with its manifest, all checked before any runs."""
    return [(v, variant_manifest(manifest, v)) for v in variants]


def run_compare(planned: list[tuple[Variant, Manifest]], items, cfg_for, console=None, address: str | None = None,
                slo=None, clock: Clock = Clock()) -> dict[str, ServeBenchResult]:
    """`planned`: plan_variants; `cfg_for(url, manifest)`: the load config for a
    variant's server at url. Variants run in order, each summary saying its manifest
    and the proxy settings it changed (as validated)."""
    from ray import serve

    results, port = {}, free_port()
    try:  # one Ray Serve (and port) for all variants; each gets fresh instances, master and slaves
        for variant, v_manifest in planned:
            v_manifest = with_clock(v_manifest, clock)
            with local_server(v_manifest, address, port=port, keep_serve=True) as server:
                if console is not None:
                    console.print(f"[bold]{variant.name}[/bold]: {len(items)} requests against {server.url}")
                res = run_serve_bench(items, cfg_for(server.url, v_manifest), slo, console, variant.name, clock,
                                      v_manifest.engine.block_size)
            res.summary.update(manifest=v_manifest.name,
                               settings={k: getattr(v_manifest.proxy, k) for k, _ in variant.settings})
            results[variant.name] = res
    finally:
        serve.shutdown()
    return results


def print_compare(results: dict[str, ServeBenchResult], console, title: str) -> None:
    """One row per variant; goodput columns when an SLO was given; the caption says
    the latencies' unit (device ms under a time_scale other than 1)."""
    from rich.table import Table

    summaries = [r.summary for r in results.values()]
    columns = COLUMNS + (SLO_COLUMNS if any("slo_attainment" in s for s in summaries) else ())
    first = summaries[0] if summaries else {}
    device = first.get("latency_unit") == "device_s"
    caption = f"latencies in device ms, rates per device s (time_scale {first['time_scale']:g})" if device else None
    table = Table(title=title, caption=caption)
    table.add_column("variant", overflow="fold")
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    for name, summary in zip(results, summaries):
        table.add_row(name, *(_cell(summary.get(key), scale) for key, _, scale in columns))
    if not console.is_terminal:  # a pipe or file: rich would squeeze the table into 80 columns
        from rich.console import Console

        console = Console(file=console.file, width=260)
    console.print(table)


def _cell(value, scale: float) -> str:
    """Three significant digits, whole numbers from 1000 up (no exponents)."""
    if not isinstance(value, float):
        return "-" if value is None else str(value)
    value *= scale
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def plot_compare(results: dict[str, ServeBenchResult], path: str, title: str) -> None:
    """Bars per variant: TTFT p50/p99, TPOT p50 (ms) and the KV hit rate beside its ideal."""
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
    hit.bar(x, [results[n].summary.get("kv_hit_rate") or 0 for n in names], label="achieved")
    hit.scatter(x, [results[n].summary.get("ideal_kv_hit_rate") or 0 for n in names], marker="_", s=400,
                color="black", label="ideal (unbounded cache)")
    hit.set_xticks(x, names, rotation=15)
    hit.set_ylabel("KV hit rate")
    hit.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

