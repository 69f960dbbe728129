"""Helpers shared by test modules."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import yaml

from actors.model.config import ModelConfig

MODELS = Path(__file__).resolve().parent.parent / "manifests" / "models"


def tiny(name: str, **overrides) -> ModelConfig:
    """A shipped model-shape file (manifests/models/NAME.yaml) with fields overridden."""
    data = yaml.safe_load((MODELS / f"{name}.yaml").read_text())
    data.update(overrides)
    return ModelConfig(**data)


def reference_text(cfg: ModelConfig):
    """text(prompt, n, stop_at_eos=True): the single-process reference's greedy
    completion of a text prompt, decoded by the shipped tokenizer."""
    from actors.model.reference import build_reference, generate
    from cluster.proxy.tokens import Tokenizer

    model, tok = build_reference(cfg), Tokenizer.from_file()

    def text(prompt: str, n: int, stop_at_eos: bool = True) -> str:
        stop = {tok.eos_token_id} if stop_at_eos else set()
        return tok.decode(generate(model, [tok.encode(prompt)], n, stop_token_ids=stop).tokens[0])

    return text


@contextmanager
def serving(manifest: dict):
    """An OmniRay server of a manifest mapping (paths relative to manifests/) on a
    free port, shut down when the block ends."""
    from cluster.bench.serve import free_port
    from cluster.config import MANIFEST_DIR, parse_manifest
    from cluster.server import start_server

    srv = start_server(parse_manifest(manifest, MANIFEST_DIR), port=free_port())
    try:
        yield srv
    finally:
        srv.shutdown()


def generate_during(inst, prompts: list[list[int]], max_tokens: int, action, after_tokens: int = 3,
                    block_size: int = 16):
    """Stream every prompt straight through `inst`'s engine; once each has
    `after_tokens` tokens, run `action()` in a thread while the streams go on.
    Returns (tokens per prompt, action's result). `block_size`: the engine's
    (SchedulerConfig's default), which the requests' prefix hashes must match."""
    import asyncio
    import threading
    import uuid

    from actors.kv_hash import block_hashes
    from actors.protocol import EngineRequest

    result = {}
    started = threading.Event()

    async def one(i, prompt, progress):
        req = EngineRequest(f"e{i}-{uuid.uuid4().hex[:4]}", prompt, max_tokens=max_tokens, ignore_eos=True,
                            block_hashes=block_hashes(prompt, block_size))
        out = []
        async for ref in inst.engine.generate.remote(req):
            out += (await ref).token_ids
            progress[i] = len(out)
            if all(p >= after_tokens for p in progress) and not started.is_set():
                started.set()
                threading.Thread(target=lambda: result.setdefault("action", action())).start()
        return out

    async def main():
        progress = [0] * len(prompts)
        return await asyncio.gather(*(one(i, p, progress) for i, p in enumerate(prompts)))

    tokens = asyncio.run(main())
    for _ in range(600):
        if "action" in result:
            break
        threading.Event().wait(0.05)
    return tokens, result.get("action")
