"""`omniray bench serve` and `omniray bench compare`: their flags and what they
run (cluster.cli registers them). Both build one workload, on one clock
(cluster.bench.clock), and run it against a server per manifest or at --url."""

from __future__ import annotations

from cluster.cli_args import positive, positive_float
from cluster.config import load_manifest

DEFAULT_POLICIES = "round_robin,least_loaded,cache_aware,omni_reference,omni"


def _workload(args, vocab_size: int, time_scale: float):
    from cluster.bench.workloads import make_workload

    return make_workload(args.workload, args.requests, seed=args.seed, token_range=(16, vocab_size),
                         input_len=args.input_len, output_len=args.output_len, block_tokens=args.block_tokens,
                         time_scale=time_scale, speedup=args.speedup, max_requests=args.max_requests,
                         num_prefixes=args.num_prefixes, prefix_len=args.prefix_len, turns=args.turns)


def _slo(args):
    """The goodput SLO of --slo-*-ms (None: none given), in seconds."""
    from cluster.bench.report import SLO

    if not (args.slo_ttft_ms or args.slo_tpot_ms or args.slo_e2e_ms):
        return None
    ms = lambda v: v / 1000 if v else None  # noqa: E731
    return SLO(ms(args.slo_ttft_ms), ms(args.slo_tpot_ms), ms(args.slo_e2e_ms))


def _detokenizer(manifest):
    from cluster.proxy.tokens import Tokenizer

    tok = Tokenizer.from_file(manifest.tokenizer)
    return lambda ids: tok.decode(ids)


def cmd_bench_serve(args, console) -> int:
    from contextlib import nullcontext

    from cluster.bench.clock import experiment_clock, with_clock
    from cluster.bench.loadgen import LoadConfig
    from cluster.bench.report import print_summary
    from cluster.bench.serve import local_server, run_serve_bench, write_outputs

    manifest = load_manifest(args.manifest)
    clock = experiment_clock(None if args.url else [manifest], args.time_scale)
    manifest = with_clock(manifest, clock)
    items = _workload(args, args.vocab_size or manifest.model.vocab_size, clock.time_scale)
    block_size = args.block_size if args.url else manifest.engine.block_size
    with (nullcontext(None) if args.url else local_server(manifest, args.address)) as server:
        url = args.url or server.url
        console.print(f"{len(items)} requests of workload {args.workload} against {url}")
        cfg = LoadConfig(url, args.model, args.concurrency, clock.wall_qps(args.qps), args.seed, args.api_key,
                         detokenize=_detokenizer(manifest) if args.text or args.chat else None, chat=args.chat)
        result = run_serve_bench(items, cfg, _slo(args), console, args.workload, clock, block_size)
    print_summary(result.summary, console, f"bench serve: {args.workload}")
    write_outputs(result, args.out, args.plot, args.json, f"omniray bench serve: {args.workload}")
    return 0 if result.summary["failed"] == 0 else 1


def cmd_bench_compare(args, console) -> int:
    from cluster.bench.clock import experiment_clock
    from cluster.bench.compare import (parse_vary, parse_variants, plan_variants, plot_compare, print_compare,
                                       run_compare)
    from cluster.bench.loadgen import LoadConfig
    from cluster.bench.report import write_json

    if args.variants and args.vary:
        raise ValueError("--variants and --vary: give one (--variants can change settings per manifest)")
    manifest = load_manifest(args.manifest)
    variants = parse_variants(args.variants) if args.variants else parse_vary(args.vary or f"policy={args.policies}")
    planned = plan_variants(manifest, variants)
    manifests = [m for _, m in planned]
    clock = experiment_clock(manifests, args.time_scale)
    items = _workload(args, min(m.model.vocab_size for m in manifests), clock.time_scale)  # one workload for all

    def cfg_for(url: str, m) -> LoadConfig:
        return LoadConfig(url, None, args.concurrency, clock.wall_qps(args.qps), args.seed,
                          m.proxy.api_keys[0] if m.proxy.api_keys else None,
                          detokenize=_detokenizer(m) if args.text or args.chat else None, chat=args.chat)

    results = run_compare(planned, items, cfg_for, console, args.address, _slo(args), clock)
    names = sorted({m.name for m in manifests})
    title = f"bench compare: {args.workload}, {len(items)} requests, manifest {', '.join(names)}"
    print_compare(results, console, title)
    if args.plot:
        plot_compare(results, args.plot, title)
    if args.json:
        write_json({name: r.summary for name, r in results.items()}, args.json)
    return 0 if all(r.summary["failed"] == 0 for r in results.values()) else 1


def add_serve_parser(bench, console) -> None:
    bs = bench.add_parser("serve", help="load-test an OpenAI-compatible server (default: one started from a manifest)")
    bs.add_argument("--url", default=None, help="server base URL; default: start OmniRay from --manifest")
    bs.add_argument("--manifest", default="local")
    bs.add_argument("--address", default=None, help="Ray cluster for the server this command starts")
    _workload_args(bs)
    bs.add_argument("--concurrency", type=positive, default=16, help="requests in flight at most")
    bs.add_argument("--qps", type=float, default=None, help="Poisson arrivals per device second (default: closed loop)")
    bs.add_argument("--model", default=None, help="model name (default: the server's first)")
    bs.add_argument("--api-key", default=None)
    bs.add_argument("--vocab-size", type=positive, default=None,
                    help="token ids of synthetic prompts stay below this (default: the manifest model's)")
    bs.add_argument("--block-size", type=positive, default=None,
                    help="with --url: the server's KV block size, for the ideal hit rate "
                         "(default: what its /v1/cluster says, else 16)")
    _slo_args(bs)
    bs.add_argument("--out", default=None, help="per-request results (parquet)")
    bs.add_argument("--plot", default=None, help="latency CDFs and throughput over time (PNG)")
    bs.add_argument("--json", default=None, help="write the summary here")
    bs.add_argument("--text", action="store_true", help="send prompts as text (the server tokenizes them)")
    bs.add_argument("--chat", action="store_true", help="multi-turn: send conversations as chat messages (text)")
    bs.set_defaults(func=lambda args: cmd_bench_serve(args, console))


def add_compare_parser(bench, console) -> None:
    bc = bench.add_parser("compare", help="one workload against a fresh server per variant of a proxy setting")
    bc.add_argument("--manifest", default="local-routing")
    bc.add_argument("--address", default=None)
    bc.add_argument("--policies", default=DEFAULT_POLICIES, help="routing policies to compare (the default variation)")
    bc.add_argument("--vary", default=None, help="KEY=V1,V2 over a proxy setting instead, e.g. pd_mode=sequential,"
                    "parallel | weighted_sorting=true,false | tokenizer_reuse=true,false (with --text)")
    bc.add_argument("--variants", default=None,
                    help="'SPEC;SPEC...', each MANIFEST[:KEY=VALUE...], a server of its own manifest per variant, "
                         "e.g. 'routing-72b;pd-72b:pd_mode=sequential;pd-72b:pd_mode=parallel'")
    _workload_args(bc)
    bc.add_argument("--concurrency", type=positive, default=16)
    bc.add_argument("--qps", type=float, default=None, help="Poisson arrivals per device second")
    _slo_args(bc)
    bc.add_argument("--text", action="store_true", help="send prompts as text (needed to compare tokenizer reuse)")
    bc.add_argument("--chat", action="store_true", help="multi-turn: send conversations as chat messages (text)")
    bc.add_argument("--plot", default=None, help="bar chart of the variants (PNG)")
    bc.add_argument("--json", default=None, help="write {variant: summary} here")
    bc.set_defaults(func=lambda args: cmd_bench_compare(args, console))


def _slo_args(p) -> None:
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput SLO: TTFT bound (device ms when emulated)")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput SLO: TPOT bound")
    p.add_argument("--slo-e2e-ms", type=float, default=None, help="goodput SLO: end-to-end bound")


def _workload_args(p) -> None:
    p.add_argument("--workload", default="shared-prefix",
                   help="random | shared-prefix | multi-turn | trace:PATH (Mooncake JSONL)")
    p.add_argument("--requests", type=positive, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-len", type=positive, default=128, help="mean prompt tokens (synthetic workloads)")
    p.add_argument("--output-len", type=positive, default=32, help="mean output tokens (synthetic workloads)")
    p.add_argument("--num-prefixes", type=positive, default=4, help="shared-prefix: distinct shared prefixes")
    p.add_argument("--prefix-len", type=positive, default=96, help="shared-prefix: tokens of each shared prefix")
    p.add_argument("--turns", type=positive, default=4, help="multi-turn: turns per conversation")
    p.add_argument("--block-tokens", type=positive, default=16, help="trace: tokens per hash block after scaling")
    p.add_argument("--time-scale", type=positive_float, default=None,
                   help="wall seconds per device second for the whole run: a trace's arrivals and --qps stretch by "
                        "it, and an emulated manifest started here sleeps by it (default: that manifest's "
                        "time_scale, else 1); latencies then read in device seconds")
    p.add_argument("--max-requests", type=positive, default=None, help="trace: replay at most this many lines")
    p.add_argument("--speedup", type=positive_float, default=1.0,
                   help="trace: replay it this many times as fast, in device time (the offered load: a cluster "
                        "smaller than the trace's sees a share of it)")
