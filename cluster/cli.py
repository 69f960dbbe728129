"""The `omniray` command. Each subcommand parses its flags and calls one function."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from cluster.config import ManifestError, load_manifest

console = Console()


def _ep_list(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ep: expected comma-separated integers, got {text!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"--ep: sizes must be positive integers, got {text!r}")
    return sizes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def cmd_verify(args) -> int:
    from cluster.launcher import connect
    from cluster.verify import run_verify

    manifest = load_manifest(args.manifest)
    connect(args.address)
    rows = run_verify(manifest, args.ep, args.tokens)
    table = Table(title=f"omniray verify — {manifest.model.name} ({manifest.model.dtype}) vs single-process reference")
    for col in ("EP", "prompts", "tokens", "mismatched", "max |Δlogit|", "tolerance", "wall s", "result"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r.ep), str(r.prompts), str(r.tokens), str(r.mismatched_tokens), f"{r.max_logit_diff:.2e}",
            f"{r.tolerance:.0e}", f"{r.wall_s:.2f}", "[green]PASS" if r.ok else "[red]FAIL",
        )
    console.print(table)
    return 0 if all(r.ok for r in rows) else 1


def cmd_bench_ep(args) -> int:
    from cluster.bench.ep import print_ep_bench, run_ep_bench
    from cluster.launcher import connect

    manifest = load_manifest(args.manifest)
    connect(args.address)
    result = run_ep_bench(manifest, args.ep, args.batch, args.prompt_len, args.steps, args.repeats)
    print_ep_bench(result, console)
    if args.json:
        result.write_json(args.json)
    return 0


def cmd_bench_engine(args) -> int:
    from cluster.bench.engine import print_engine_bench, run_engine_bench
    from cluster.launcher import connect

    manifest = load_manifest(args.manifest)
    connect(args.address)
    result = run_engine_bench(manifest, args.ep, args.batches, args.prompt_len, args.output_len,
                              args.prefix_len, args.suffix_len, args.repeats)
    print_engine_bench(result, console)
    if args.json:
        result.write_json(args.json)
    return 0 if result.tokens_match else 1


def cmd_serve(args) -> int:
    import signal
    import threading

    from cluster.launcher import connect
    from cluster.server import start_server

    manifest = load_manifest(args.manifest)
    if args.api_key:
        manifest.proxy.api_keys = [args.api_key]
    connect(args.address, include_dashboard=args.dashboard)
    server = start_server(manifest, args.host, args.port, args.grpc_port)
    grpc = f", gRPC at {server.grpc_address}" if server.grpc_address else ""
    console.print(f"[green]OmniRay serving {manifest.model.name}[/green] at {server.url}/v1{grpc} "
                  f"({len(server.instances)} instances, {manifest.compute} compute) — Ctrl-C to stop")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    console.print("shutting down")
    server.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omniray", description="Serve MoE models on Ray with emulated Ascend NPUs.")
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="check that EP instances generate exactly the reference's tokens")
    v.add_argument("--manifest", default="local", help="manifest path or shipped name (default: local)")
    v.add_argument("--ep", type=_ep_list, default=[1, 2, 4], help="EP sizes, e.g. 1,2,4")
    v.add_argument("--tokens", type=_positive, default=32, help="tokens to generate per prompt")
    v.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
    v.set_defaults(func=cmd_verify)

    sv = sub.add_parser("serve", help="serve the manifest's model through the OpenAI-compatible Omni Proxy")
    sv.add_argument("--manifest", default="local", help="manifest path or shipped name (default: local)")
    sv.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=_positive, default=8000)
    sv.add_argument("--grpc-port", type=_positive, default=None, help="also serve gRPC (omniray.proto) on this port")
    sv.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer KEY)")
    sv.add_argument("--dashboard", action="store_true", help="start the Ray dashboard too")
    sv.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    be = bench.add_parser("ep", help="per-step time of EP instances vs the single-process reference")
    be.add_argument("--manifest", default="local")
    be.add_argument("--ep", type=_ep_list, default=[4])
    be.add_argument("--batch", type=_positive, default=16, help="sequences in the batch")
    be.add_argument("--prompt-len", type=_positive, default=32)
    be.add_argument("--steps", type=_positive, default=16, help="decode steps timed")
    be.add_argument("--repeats", type=_positive, default=3)
    be.add_argument("--address", default=None)
    be.add_argument("--json", default=None, help="write the summary here")
    be.set_defaults(func=cmd_bench_ep)
    bg = bench.add_parser("engine", help="instance engine throughput and prefix reuse vs the single-process reference")
    bg.add_argument("--manifest", default="local")
    bg.add_argument("--ep", type=_positive, default=2, help="EP size of the instance")
    bg.add_argument("--batches", type=_ep_list, default=[1, 8, 32], help="requests submitted at once, e.g. 1,8,32")
    bg.add_argument("--prompt-len", type=_positive, default=32)
    bg.add_argument("--output-len", type=_positive, default=16, help="tokens generated per request")
    bg.add_argument("--prefix-len", type=_positive, default=288, help="shared prefix of the prefix-reuse prompt")
    bg.add_argument("--suffix-len", type=_positive, default=32, help="its distinct suffix")
    bg.add_argument("--repeats", type=_positive, default=3)
    bg.add_argument("--address", default=None)
    bg.add_argument("--json", default=None, help="write the summary here")
    bg.set_defaults(func=cmd_bench_engine)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ManifestError as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
