#!/usr/bin/env python
"""Screenshots of the Ray dashboard while OmniRay serves: its Serve page (the
`omniray` application and its deployment) and its Actors page (the NPU actors,
the master, the engines, the global KV cache).

    python scripts/dashboard_screenshot.py [--out docs] [--manifest local] [--requests 24]

Starts `omniray serve --dashboard` on a free port, sends a few completions,
then runs headless Chromium (`chromium`, Debian's package: apt-get install
chromium) on each page and stops the server with Ctrl-C's signal. Ray's token
authentication stays on: Chromium goes through a small local proxy that adds
`Authorization: Bearer <token>` (the dashboard's own login sets a cookie, which
a plain `chromium --screenshot` cannot), the token read as Ray reads it
($RAY_AUTH_TOKEN, else ~/.ray/auth_token).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from cluster.bench.serve import free_port

ROOT = Path(__file__).resolve().parents[1]
# file -> (page, window): Serve down to its applications table, Actors tall enough for its first ten rows
# (the NPU actors among them)
PAGES = {"ray_dashboard_serve.png": ("#/serve", "1440,600"), "ray_dashboard_actors.png": ("#/actors", "1440,1400")}
STARTS = 3
RENDER_MS = 20000  # virtual time for the dashboard's JS to fetch and draw (it polls every few seconds)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("installing chromium (apt-get)", flush=True)
        subprocess.run("apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                       "--no-install-recommends chromium", shell=True, check=True, stdout=subprocess.DEVNULL)
        return shutil.which("chromium")
    sys.exit("no chromium: apt-get install chromium")


def ray_token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return path.read_text().strip() if path.exists() else None


class Serve:
    """`omniray serve --dashboard` in its own process group; its output is read for
    the dashboard's address (Ray moves past a busy 8265)."""

    def __init__(self, manifest: str, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.dashboard: str | None = None
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--dashboard", "--manifest", manifest,
                                      "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"View the dashboard at \S*?(https?://[\w.:-]+)", line)
            if m and self.dashboard is None:
                self.dashboard = m.group(1)

    def wait_ready(self, timeout_s: float = 300) -> bool:
        """True once it serves; False if it exited first (on a busy machine Ray's
        raylet can give up on its slow dashboard agent: start it again)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                print("omniray serve exited:\n" + "".join(self.lines[-10:]), file=sys.stderr, flush=True)
                return False
            try:
                if self.dashboard and httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        sys.exit("omniray serve did not answer in time:\n" + "".join(self.lines[-30:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # its own clean teardown, as Ctrl-C
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def load(url: str, n: int) -> None:
    prompts = ["The experts of a mixture", "Ray actors hold the weights of one NPU each and",
               "A router picks two experts for every token"]
    with httpx.Client(base_url=url, timeout=120) as http:
        for i in range(n):
            r = http.post("/v1/completions", json={"model": http.get("/v1/models").json()["data"][0]["id"],
                                                   "prompt": prompts[i % len(prompts)], "max_tokens": 8})
            r.raise_for_status()


def start_auth_proxy(upstream: str, token: str | None) -> str:
    """A local HTTP proxy to the dashboard that adds the Ray token to every request."""
    from aiohttp import ClientSession, web

    port = free_port()
    hop = {"transfer-encoding", "content-encoding", "content-length", "connection", "keep-alive"}

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop | {"host"}}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with ClientSession(auto_decompress=True) as session:
            async with session.request(request.method, upstream + request.rel_url.path_qs, headers=headers,
                                       data=await request.read(), allow_redirects=False) as resp:
                body = await resp.read()
                out = {k: v for k, v in resp.headers.items() if k.lower() not in hop}
                return web.Response(status=resp.status, body=body, headers=out)

    def run() -> None:
        loop = asyncio.new_event_loop()
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/version", timeout=5)
            return f"http://127.0.0.1:{port}"
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def screenshot(browser: str, url: str, window: str, out: Path) -> None:
    with_profile = f"--user-data-dir={out.parent / '.chromium-profile'}"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", with_profile,
                    f"--window-size={window}", f"--virtual-time-budget={RENDER_MS}", f"--screenshot={out}", url],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
    shutil.rmtree(out.parent / ".chromium-profile", ignore_errors=True)


def shrink(path: Path) -> None:
    """A palette PNG: a screenshot of a web page keeps its look at a fraction of the size."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=128)
    small.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int | str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNG files (default docs/)")
    ap.add_argument("--manifest", default="local")
    ap.add_argument("--requests", type=int, default=24)
    args = ap.parse_args(argv)
    browser = chromium()
    args.out.mkdir(parents=True, exist_ok=True)
    for _ in range(STARTS):
        serve = Serve(args.manifest, free_port())
        if serve.wait_ready():
            break
    else:
        return f"omniray serve did not start in {STARTS} tries"
    try:
        print(f"serving at {serve.url}, Ray dashboard at {serve.dashboard}", flush=True)
        load(serve.url, args.requests)
        proxy = start_auth_proxy(serve.dashboard, ray_token())
        for name, (page, window) in PAGES.items():
            out = args.out / name
            screenshot(browser, f"{proxy}/{page}", window, out)
            shrink(out)
            print(f"wrote {out} ({out.stat().st_size // 1024} KiB)", flush=True)
    finally:
        serve.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
