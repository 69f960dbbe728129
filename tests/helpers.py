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
