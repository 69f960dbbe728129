"""Helpers shared by test modules."""

from __future__ import annotations

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
