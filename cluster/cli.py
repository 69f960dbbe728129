"""The `omniray` command. Each subcommand parses its flags and calls one function."""

from __future__ import annotations

import argparse
import os
import sys
import time

from rich.console import Console
from rich.table import Table

from cluster.cli_args import ep_list, positive
from cluster.config import API_KEY_ENV, load_manifest

SHUTDOWN_TIMEOUT_S = 45.0  # `omniray serve`: Ctrl-C waits this long for a clean shutdown, then exits

console = Console()
# errors go to stderr, as argparse's do, unwrapped (a message naming a field stays on one line)
errors = Console(stderr=True, soft_wrap=True)


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
                              args.prefix_len, args.suffix_len, args.repeats, args.compare_overlap)
    print_engine_bench(result, console)
    if args.json:
        result.write_json(args.json)
    return 0 if result.tokens_match else 1


def cmd_bench_latency(args) -> int:
    from cluster.bench.latency import print_latency, run_latency_bench
    from cluster.bench.report import write_json

    result = run_latency_bench(load_manifest(args.manifest), args.requests, args.prompt_tokens, address=args.address)
    print_latency(result, console)
    if args.json:
        write_json(result.to_dict(), args.json)
    return 0


def cmd_bench_elastic(args) -> int:
    from cluster.bench.elastic import ElasticBenchConfig, print_elastic, run_elastic_bench
    from cluster.bench.report import write_json

    manifest = load_manifest(args.manifest)
    cfg = ElasticBenchConfig(instance=args.instance, to_ep=args.to_ep, concurrency=args.concurrency,
                             phase_s=args.phase_s, warmup_s=args.warmup_s, cycles=args.cycles,
                             input_len=args.input_len, output_len=args.output_len, standby=args.standby,
                             seed=args.seed, direct=args.direct)
    summary = run_elastic_bench(manifest, cfg, args.address, console)
    print_elastic(summary, console)
    if args.json:
        write_json(summary, args.json)
    return 0 if summary["failed"] == 0 else 1


def cmd_bench_placement(args) -> int:
    from cluster.bench.placement import print_placement, run_placement_bench
    from cluster.bench.report import write_json
    from cluster.launcher import connect

    manifest = load_manifest(args.manifest)
    connect(args.address, log_to_driver=False)
    summary = run_placement_bench(manifest, args.ep, args.requests, args.max_tokens, args.redundant, args.seed)
    print_placement(summary, console)
    if args.json:
        write_json(summary, args.json)
    return 0 if summary["tokens_unchanged"] else 1


def cmd_bench_chaos(args) -> int:
    from cluster.bench.chaos import print_chaos, run_chaos_bench
    from cluster.bench.report import write_json

    manifest = load_manifest(args.manifest)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if faults == ["none"]:  # a soak: no fault, memory and latency over time
        return _soak(args, manifest)
    if args.duration is not None:
        print("omniray: --duration: only with --faults none (a soak); faults run in phases of --phase-s",
              file=sys.stderr)
        return 2
    summary = run_chaos_bench(manifest, faults, args.concurrency, args.phase_s, args.output_len, args.seed,
                              args.address, console)
    print_chaos(summary, console)
    if args.json:
        write_json(summary, args.json)
    return 0 if summary["failed"] == 0 else 1


def _soak(args, manifest) -> int:
    from cluster.bench.report import write_json
    from cluster.bench.soak import print_soak, run_soak

    if args.duration is None:
        print("omniray: --duration: required with --faults none (the soak's length in seconds)", file=sys.stderr)
        return 2
    summary = run_soak(manifest, args.duration, args.concurrency, args.output_len, args.seed, args.warmup,
                       address=args.address, console=console)
    print_soak(summary, console)
    if args.json:
        write_json(summary, args.json)
    return 0 if summary["failed"] == 0 else 1


def cmd_simulate(args) -> int:
    import json

    from cluster.bench.simulate import print_simulation, run_simulation
    from cluster.launcher import connect

    if args.through_proxy and args.paper:
        errors.print("[red]error:[/red] --through-proxy runs one manifest, not --paper")
        return 2
    if args.paper:
        return _simulate_paper(args)
    if args.analytic or args.fit:
        errors.print("[red]error:[/red] --analytic and --fit go with --paper")
        return 2
    manifest = load_manifest(args.manifest)
    connect(args.address)
    result = run_simulation(manifest, args.batch, args.input_len, args.output_len, args.seed,
                            through_proxy=args.through_proxy)
    print_simulation(result, console)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return 0


def _simulate_paper(args) -> int:
    import json

    from cluster.bench.paper import FITTED, ROWS, fit, print_rows, results, run_row

    if args.fit:
        from actors.devices import get_device

        calibrations = {}
        for device in sorted({load_manifest(r.manifest).device for r in ROWS}):
            cal = fit(device)
            calibrations[device] = cal
            stored = get_device(device).calibration
            values = ", ".join(f"{n} {getattr(cal, n):.4g} (catalog {getattr(stored, n):.4g})" for n in cal.fitted)
            console.print(f"{device}: {values}; fitted on {', '.join(cal.fitted_on)}")
        rows = results(calibrations=calibrations)
        title = f"published figures, analytic, under the fitted {'/'.join(FITTED)}"
    elif args.analytic:
        rows, title = results(), "published figures, priced by the cost model"
    else:
        from cluster.launcher import connect

        connect(args.address, log_to_driver=False)
        rows, title = [run_row(r, args.seed) for r in ROWS], "published figures, run through the engine (time_scale 0)"
    print_rows(rows, console, title)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in rows], f, indent=2)
    return 0


def cmd_status(args) -> int:
    from cluster.status import fetch_http, fetch_ray, watch

    if args.url:
        def fetch():
            return fetch_http(args.url, args.api_key)
    else:
        def fetch():
            return fetch_ray(args.address)
    try:
        watch(fetch, console, args.interval, args.once)
    except KeyboardInterrupt:
        pass
    except RuntimeError as err:
        errors.print(f"[red]error:[/red] {err}")
        return 2
    return 0


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_exposure(host: str, api_keys: list[str], allow_unauthenticated: bool) -> None:
    """An API off this machine needs a key: refuse before anything starts."""
    if not api_keys and not is_loopback(host) and not allow_unauthenticated:
        raise ValueError(f"--host {host} serves beyond this machine and no API key is set: give --api-key KEY "
                         f"(or ${API_KEY_ENV}, or proxy.api_keys in the manifest), or --allow-unauthenticated "
                         "to serve without one")


def cmd_serve(args) -> int:
    import signal

    import ray

    from cluster.launcher import connect
    from cluster.server import start_server

    manifest = load_manifest(args.manifest)
    if args.api_key:
        manifest.proxy.api_keys = [args.api_key]
    if args.admin_key:
        manifest.proxy.admin_keys = [args.admin_key]
    check_exposure(args.host, manifest.proxy.api_keys, args.allow_unauthenticated)
    # both signals set explicitly: a shell starts background jobs with SIGINT ignored, and Ctrl-C must still work
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        connect(args.address, include_dashboard=args.dashboard)
        server = start_server(manifest, args.host, args.port, args.grpc_port)
    except KeyboardInterrupt:
        console.print("interrupted while starting: shutting down")
        ray.shutdown()
        return 130
    grpc = f", gRPC at {server.grpc_address}" if server.grpc_address else ""
    gcs = ray.get_runtime_context().gcs_address
    # Ray enables token auth only for a cluster it finds itself, never for an explicit address
    auth = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else ""
    console.print(f"Ray at {gcs}: `{auth}omniray status --address {gcs}` watches it", soft_wrap=True)
    console.print(f"[green]OmniRay serving {manifest.model.name}[/green] at {server.url}/v1{grpc} "
                  f"({len(server.instances)} instances, {manifest.compute} compute) — Ctrl-C to stop")
    signals = []  # one per SIGINT/SIGTERM received
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: signals.append(1))
    while not signals:
        time.sleep(0.2)  # a short sleep lets the handler run promptly
    console.print("shutting down (Ctrl-C again to stop at once)")
    why = bounded_teardown(server.shutdown, signals, SHUTDOWN_TIMEOUT_S)
    if why is not None:
        console.print(f"[yellow]shutdown {why} while {server.stage}: exiting[/yellow]"
                      + (f" (actors of the cluster at {args.address} may be left: `ray stop` clears them)"
                         if args.address else ""))
    return 0


def bounded_teardown(shutdown, signals: list, timeout_s: float) -> str | None:
    """Run `shutdown` in a thread until it returns, a second signal arrives (`signals`
    grows past one) or `timeout_s` pass; None if it finished, else why it was left.
    A stuck step (a replica that never stops) must not keep `omniray serve` from
    exiting, and exiting tears down an embedded Ray with everything in it."""
    import threading

    done = threading.Thread(target=shutdown, daemon=True, name="shutdown")
    done.start()
    deadline = time.monotonic() + timeout_s
    while done.is_alive() and len(signals) < 2 and time.monotonic() < deadline:
        done.join(0.05)
    if not done.is_alive():
        return None
    return "interrupted again" if len(signals) > 1 else f"not done after {timeout_s:g} s"


def _admin_post(url: str, path: str, body: dict, admin_key: str | None) -> int:
    """POST an admin request to a running server and print its answer."""
    import json
    import os

    import httpx

    key = admin_key or os.environ.get("OMNIRAY_ADMIN_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.post(url.rstrip("/") + path, json=body, headers=headers, timeout=600)
    except httpx.HTTPError as err:
        errors.print(f"[red]error:[/red] {url}: {err}")
        return 2
    data = r.json() if r.headers.get("content-type", "").startswith("application/json") else {"text": r.text}
    if r.status_code != 200:
        errors.print(f"[red]error {r.status_code}:[/red] {data.get('error', {}).get('message', data)}")
        return 2
    console.print_json(json.dumps(data))
    return 0


def cmd_scale(args) -> int:
    if sum(x is not None for x in (args.instance, args.add_instance, args.remove_instance)) != 1:
        raise ValueError("give exactly one of --instance (with --npus), --add-instance ROLE, --remove-instance NAME")
    if args.instance is not None and args.npus is None:
        raise ValueError("--npus: required with --instance")
    body = {k: v for k, v in {"instance": args.instance, "npus": args.npus, "add_instance": args.add_instance,
                              "remove_instance": args.remove_instance}.items() if v is not None}
    return _admin_post(args.url, "/v1/cluster/scale", body, args.admin_key)


def cmd_rebalance(args) -> int:
    return _admin_post(args.url, "/v1/cluster/rebalance", {"instance": args.instance} if args.instance else {},
                       args.admin_key)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omniray", description="Serve MoE models on Ray with emulated Ascend NPUs.")
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="check that EP instances generate exactly the reference's tokens")
    v.add_argument("--manifest", default="local", help="manifest path or shipped name (default: local)")
    v.add_argument("--ep", type=ep_list, default=[1, 2, 4], help="EP sizes, e.g. 1,2,4")
    v.add_argument("--tokens", type=positive, default=32, help="tokens to generate per prompt")
    v.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
    v.set_defaults(func=cmd_verify)

    sv = sub.add_parser("serve", help="serve the manifest's model through the OpenAI-compatible Omni Proxy")
    sv.add_argument("--manifest", default="local", help="manifest path or shipped name (default: local)")
    sv.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=positive, default=8000)
    sv.add_argument("--grpc-port", type=positive, default=None, help="also serve gRPC (omniray.proto) on this port")
    sv.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                    help=f"require this key (Authorization: Bearer KEY); default ${API_KEY_ENV}. A --host other "
                         "than loopback needs one")
    sv.add_argument("--allow-unauthenticated", action="store_true",
                    help="serve a non-loopback --host without an API key")
    sv.add_argument("--admin-key", default=None, help="enable /v1/cluster/scale and /rebalance with this key")
    sv.add_argument("--dashboard", action="store_true", help="start the Ray dashboard too")
    sv.set_defaults(func=cmd_serve)

    sc = sub.add_parser("scale", help="resize an instance's EP, or add / remove an instance, while serving")
    sc.add_argument("--url", default="http://127.0.0.1:8000", help="the running server")
    sc.add_argument("--instance", default=None, help="the instance to resize (with --npus)")
    sc.add_argument("--npus", type=positive, default=None, help="its new EP size (or the added instance's)")
    sc.add_argument("--add-instance", default=None, choices=["prefill", "decode", "mixed"], help="add one of this role")
    sc.add_argument("--remove-instance", default=None, help="drain this instance, then remove it")
    sc.add_argument("--admin-key", default=None, help="the server's admin key (or $OMNIRAY_ADMIN_KEY)")
    sc.set_defaults(func=cmd_scale)

    rb = sub.add_parser("rebalance", help="Omni Placement: recompute expert maps from the measured load")
    rb.add_argument("--url", default="http://127.0.0.1:8000", help="the running server")
    rb.add_argument("--instance", default=None, help="only this instance (default: all)")
    rb.add_argument("--admin-key", default=None, help="the server's admin key (or $OMNIRAY_ADMIN_KEY)")
    rb.set_defaults(func=cmd_rebalance)

    sm = sub.add_parser("simulate", help="an emulated model on the real scheduling path, timed by the cost model")
    sm.add_argument("--manifest", default="pangu-pro-moe-72b", help="an emulated manifest (default pangu-pro-moe-72b)")
    sm.add_argument("--batch", type=positive, default=32)
    sm.add_argument("--input-len", type=positive, default=1024)
    sm.add_argument("--output-len", type=positive, default=64)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--address", default=None)
    sm.add_argument("--json", default=None, help="write the result here")
    sm.add_argument("--through-proxy", action="store_true",
                    help="serve the whole manifest and send the batch over HTTP: the master's routing, budgets and "
                         "P/D hand-off decide where each request runs (default: the first instance's engine alone)")
    sm.add_argument("--paper", action="store_true",
                    help="every published Ascend figure at its own configuration (manifests/paper/), run through "
                         "the engine: emulated next to published, calibration or held out")
    sm.add_argument("--analytic", action="store_true", help="with --paper: price the rows by the cost model only")
    sm.add_argument("--fit", action="store_true",
                    help="with --paper: fit each device's calibration on its calibration figures and print it")
    sm.set_defaults(func=cmd_simulate)

    st = sub.add_parser("status", help="live view of a running server: instances, NPUs and HBM, queue, KV cache")
    st.add_argument("--address", default=None, help="Ray cluster to join (default: auto, the running one)")
    st.add_argument("--url", default=None, help="read GET /v1/cluster of this server instead of joining Ray")
    st.add_argument("--api-key", default=None)
    st.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    st.add_argument("--once", action="store_true", help="print one view and exit")
    st.set_defaults(func=cmd_status)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    be = bench.add_parser("ep", help="per-step time of EP instances vs the single-process reference")
    be.add_argument("--manifest", default="local")
    be.add_argument("--ep", type=ep_list, default=[4])
    be.add_argument("--batch", type=positive, default=16, help="sequences in the batch")
    be.add_argument("--prompt-len", type=positive, default=32)
    be.add_argument("--steps", type=positive, default=16, help="decode steps timed")
    be.add_argument("--repeats", type=positive, default=3)
    be.add_argument("--address", default=None)
    be.add_argument("--json", default=None, help="write the summary here")
    be.set_defaults(func=cmd_bench_ep)
    bg = bench.add_parser("engine", help="instance engine throughput and prefix reuse vs the single-process reference")
    bg.add_argument("--manifest", default="local")
    bg.add_argument("--ep", type=positive, default=2, help="EP size of the instance")
    bg.add_argument("--batches", type=ep_list, default=[1, 8, 32], help="requests submitted at once, e.g. 1,8,32")
    bg.add_argument("--prompt-len", type=positive, default=32)
    bg.add_argument("--output-len", type=positive, default=16, help="tokens generated per request")
    bg.add_argument("--prefix-len", type=positive, default=288, help="shared prefix of the prefix-reuse prompt")
    bg.add_argument("--suffix-len", type=positive, default=32, help="its distinct suffix")
    bg.add_argument("--repeats", type=positive, default=3)
    bg.add_argument("--compare-overlap", action="store_true",
                    help="also run an engine with overlapped steps off, interleaved: the A/B in one run")
    bg.add_argument("--address", default=None)
    bg.add_argument("--json", default=None, help="write the summary here")
    bg.set_defaults(func=cmd_bench_engine)
    bl = bench.add_parser("latency", help="1-token requests one at a time, against a bare Ray Serve echo")
    bl.add_argument("--manifest", default="local")
    bl.add_argument("--requests", type=positive, default=100)
    bl.add_argument("--prompt-tokens", type=positive, default=4)
    bl.add_argument("--address", default=None)
    bl.add_argument("--json", default=None, help="write the summary here")
    bl.set_defaults(func=cmd_bench_latency)
    from cluster.bench.commands import add_compare_parser, add_serve_parser

    add_serve_parser(bench, console)
    add_compare_parser(bench, console)
    bl = bench.add_parser("elastic", help="ElasticMoE: scale an instance up and down under load vs a cold start")
    bl.add_argument("--manifest", default="local")
    bl.add_argument("--address", default=None)
    bl.add_argument("--instance", default=None, help="the instance to scale (default: the first decode, else mixed)")
    bl.add_argument("--to-ep", type=positive, default=None, help="EP size to scale up to (default: twice its own)")
    bl.add_argument("--concurrency", type=positive, default=8, help="requests in flight throughout")
    bl.add_argument("--phase-s", type=float, default=6.0, help="steady seconds before, between and after the events")
    bl.add_argument("--warmup-s", type=float, default=5.0, help="seconds of load before the first steady phase")
    bl.add_argument("--cycles", type=positive, default=5, help="scale up-and-down cycles (medians and totals over them)")
    bl.add_argument("--input-len", type=positive, default=32)
    bl.add_argument("--output-len", type=positive, default=64)
    bl.add_argument("--standby", type=int, default=None, help="warm NPU actors (default: as many as the scale-up adds)")
    bl.add_argument("--seed", type=int, default=0)
    bl.add_argument("--direct", action="store_true",
                    help="the instance alone, its engine fed straight (no HTTP server, proxy or client)")
    bl.add_argument("--json", default=None, help="write the summary here")
    bl.set_defaults(func=cmd_bench_elastic)
    bp = bench.add_parser("placement", help="Omni Placement: expert-load imbalance before/after, on measured load")
    bp.add_argument("--manifest", default="tiny-mla",
                    help="default tiny-mla (real compute, top-k routing); an emulated one (deepseek-v3-910c) is "
                         "routed by the seeded routing model at its expert_skew")
    bp.add_argument("--ep", type=positive, default=4)
    bp.add_argument("--requests", type=positive, default=32)
    bp.add_argument("--max-tokens", type=positive, default=16)
    bp.add_argument("--redundant", type=ep_list, default=[1, 2], help="redundant slots per NPU to plan with")
    bp.add_argument("--seed", type=int, default=0)
    bp.add_argument("--address", default=None)
    bp.add_argument("--json", default=None, help="write the summary here")
    bp.set_defaults(func=cmd_bench_placement)
    bx = bench.add_parser("chaos", help="kill an NPU, the KV cache actor and the master under load; count losses")
    bx.add_argument("--manifest", default="local-mixed", help="default local-mixed: three mixed instances")
    bx.add_argument("--faults", default="npu,kv_cache,master",
                    help="what to kill, in order, of npu, kv_cache, master, controller (it restarts)")
    bx.add_argument("--concurrency", type=positive, default=8)
    bx.add_argument("--phase-s", type=float, default=5.0, help="seconds before each fault and after the last")
    bx.add_argument("--output-len", type=positive, default=48)
    bx.add_argument("--seed", type=int, default=0)
    bx.add_argument("--address", default=None)
    bx.add_argument("--duration", type=float, default=None,
                    help="with --faults none: a soak of this many seconds (RSS of every Ray process, p99 per window)")
    bx.add_argument("--warmup", type=float, default=None, help="soak: seconds before the RSS baseline (default "
                    "min(60, duration / 5))")
    bx.add_argument("--json", default=None, help="write the summary here")
    bx.set_defaults(func=cmd_bench_chaos)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # ManifestError among them: a ValueError
        errors.print(f"[red]error:[/red] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
