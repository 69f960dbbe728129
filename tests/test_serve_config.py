"""The Serve-config path (`serve run manifests/serve-config.yaml`, KubeRay
RayService): `cluster.server:app_from_args` builds the backend in a detached
owner actor and the application serves the reference's tokens."""

from __future__ import annotations

import httpx
import pytest
import ray
from ray import serve

from actors.model.reference import build_reference, generate
from cluster.bench.serve import free_port
from cluster.config import load_manifest
from cluster.proxy.tokens import Tokenizer
from cluster.server import OWNER_NAMESPACE, app_from_args, owner_name

pytestmark = pytest.mark.serving


def test_app_from_args_serves_and_owner_holds_the_backend(ray_session, monkeypatch):
    """As the shipped configs run it: the key from $OMNIRAY_API_KEY (`api_key_env`)."""
    monkeypatch.setenv("OMNIRAY_API_KEY", "k")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    manifest = load_manifest("local")
    try:
        serve.run(app_from_args({"manifest": "local", "api_key_env": "OMNIRAY_API_KEY"}), name="omniray",
                  route_prefix="/")
        owner = ray.get_actor(owner_name(manifest), namespace=OWNER_NAMESPACE)
        assert sorted(ray.get(owner.instance_names.remote())) == ["decode0", "prefill0"]
        tok = Tokenizer.from_file()
        ids = tok.encode("served from a config file")
        want = tok.decode(generate(build_reference(manifest.model), [ids], 6,
                                   stop_token_ids={tok.eos_token_id}).tokens[0])
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                       json={"model": "tiny-gqa-moge", "prompt": "served from a config file", "max_tokens": 6,
                             "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=60).status_code == 401
    finally:
        serve.shutdown()
        try:
            ray.kill(ray.get_actor(owner_name(manifest), namespace=OWNER_NAMESPACE))
        except ValueError:
            pass


def test_app_from_args_rejects_unknown_args(ray_session):
    with pytest.raises(ValueError, match="unknown keys"):
        app_from_args({"manifest": "local", "replicas": 3})


@pytest.mark.parametrize("value", [None, ""])
def test_app_from_args_without_the_key_variable_fails_naming_it(value, monkeypatch):
    """Checked before anything starts (no Ray needed): an unset or empty variable."""
    if value is None:
        monkeypatch.delenv("OMNIRAY_API_KEY", raising=False)
    else:
        monkeypatch.setenv("OMNIRAY_API_KEY", value)
    with pytest.raises(ValueError, match="OMNIRAY_API_KEY.*not set.*secretKeyRef"):
        app_from_args({"manifest": "local", "api_key_env": "OMNIRAY_API_KEY"})
