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
import ray
from openai import OpenAI

from actors.model.reference import build_reference, generate
from cluster.bench.serve import free_port
from cluster.config import MANIFEST_DIR, load_manifest
from cluster.proxy.tokens import Tokenizer

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
def no_other_local_ray():
    """As on a user's machine, the server's Ray is the only one here: `omniray status`
    joins the local Ray it finds ("auto"), and the tests' shared one, if an earlier
    module left it up, could be the one it finds."""
    if ray.is_initialized():
        ray.shutdown()


def test_serve_command_answers_then_stops_on_ctrl_c(tmp_path, no_other_local_ray):
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
        # `omniray status` joins the running cluster and reads the master's snapshot
        status = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--once"], capture_output=True,
                                text=True, timeout=120, env=env)
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
