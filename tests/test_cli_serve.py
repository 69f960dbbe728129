"""`omniray serve` as a user runs it: a subprocess on its own embedded Ray, a
manifest of mixed instances, the openai client, then Ctrl-C tears it down."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from openai import OpenAI

from actors.model.reference import build_reference, generate
from cluster.bench.serve import free_port
from cluster.config import MANIFEST_DIR, load_manifest
from cluster.proxy.tokens import Tokenizer

pytestmark = pytest.mark.serving

MANIFEST = f"""
name: mixed-test
model: {MANIFEST_DIR / "models" / "tiny-gqa-moge.yaml"}
compute: real
instances:
  - {{name: mixed0, role: mixed, ep: 2}}
  - {{name: mixed1, role: mixed, ep: 1}}
proxy: {{policy: round_robin}}
"""



@pytest.fixture
def no_ray_start(monkeypatch):
    """`omniray serve` must decide before Ray starts: starting it fails the test."""
    import cluster.launcher

    def connect(*_a, **_k):
        raise AssertionError("Ray was started")
    monkeypatch.setattr(cluster.launcher, "connect", connect)
    monkeypatch.delenv("OMNIRAY_API_KEY", raising=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "my-host.example"])
def test_serve_off_loopback_without_a_key_refuses_naming_the_fix(host, no_ray_start, capsys):
    from cluster.cli import main

    assert main(["serve", "--host", host]) == 2
    err = capsys.readouterr().err
    assert f"--host {host}" in err and "--api-key" in err and "OMNIRAY_API_KEY" in err
    assert "proxy.api_keys" in err and "--allow-unauthenticated" in err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.0.2", "localhost", "::1", "[::1]"])
def test_is_loopback(host):
    from cluster.cli import is_loopback

    assert is_loopback(host)


@pytest.mark.parametrize("argv,env", [
    (["--host", "0.0.0.0", "--allow-unauthenticated"], None),
    (["--host", "0.0.0.0", "--api-key", "k"], None),
    (["--host", "0.0.0.0"], "k"),  # $OMNIRAY_API_KEY
    (["--host", "127.0.0.1"], None),
])
def test_serve_with_a_key_or_the_override_goes_on_to_start_ray(argv, env, no_ray_start, monkeypatch):
    from cluster.cli import main

    if env:
        monkeypatch.setenv("OMNIRAY_API_KEY", env)
    with pytest.raises(AssertionError, match="Ray was started"):
        main(["serve", *argv])


def test_manifest_api_keys_count_as_a_key(tmp_path, no_ray_start):
    from cluster.cli import main

    path = tmp_path / "keyed.yaml"
    path.write_text(MANIFEST.replace("proxy: {policy: round_robin}", "proxy: {policy: round_robin, api_keys: [k]}"))
    with pytest.raises(AssertionError, match="Ray was started"):
        main(["serve", "--manifest", str(path), "--host", "0.0.0.0"])


def test_serve_command_answers_then_stops_on_ctrl_c(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text(MANIFEST)
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--manifest", str(path), "--port", str(port),
                             "--api-key", "k"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        deadline = time.monotonic() + 180
        while not any("OmniRay serving" in line for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines[-30:])
            assert time.monotonic() < deadline, "".join(lines[-30:])
            lines.append(line)
        url = re.search(r"(http://\S+/v1)", lines[-1]).group(1)
        client = OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60)
        prompt = "Mixed instances prefill and decode"
        manifest = load_manifest(str(path))
        tok = Tokenizer.from_file()
        ref = generate(build_reference(manifest.model), [tok.encode(prompt)], 8, stop_token_ids={tok.eos_token_id})
        texts = [client.completions.create(model="tiny-gqa-moge", prompt=prompt, max_tokens=8, temperature=0)
                 .choices[0].text for _ in range(3)]
        assert texts == [tok.decode(ref.tokens[0])] * 3  # round robin: both mixed instances give the reference
        # `omniray status` joins the running cluster (the address serve printed) and reads the master's snapshot
        command = next(m.group(1) for line in lines if (m := re.match(r"Ray at \S+: `(.+)` watches it", line)))
        auth, _, args = command.rpartition("omniray ")
        assert auth == "RAY_AUTH_MODE=token ", command  # Ray's token auth stays on
        status = subprocess.run([sys.executable, "-m", "cluster.cli", *args.split(), "--once"],
                                env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "mixed0" in status.stdout and "mixed1" in status.stdout and "HBM" in status.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out[-3000:]
    assert "shutting down" in out
