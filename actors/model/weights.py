"""Weights: seeded initialisation, safetensors checkpoints and EP shards.

Every tensor is drawn from its own generator seeded by (model seed, tensor
name), so a tensor's values do not depend on which other tensors a process
builds: an NPU holding experts 8..15 gets exactly the reference's experts 8..15.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file

from actors.model.config import ModelConfig

_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def expert_of(name: str) -> tuple[int, int] | None:
    """(layer, logical expert) of a routed-expert tensor name, else None."""
    m = _EXPERT.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def init_tensor(cfg: ModelConfig, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    if _is_norm(name):
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * cfg.init_std).to(dtype)


def init_module_(module: torch.nn.Module, cfg: ModelConfig) -> None:
    """Overwrite every parameter of a model built from cfg with its seeded values."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(init_tensor(cfg, name, param.shape, param.dtype))


def save_checkpoint(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    return load_file(str(p))


def shard_names(names: Iterable[str], held_experts: Mapping[int, Iterable[int]]) -> list[str]:
    """The tensors an NPU needs: everything replicated plus its own experts."""
    held = {layer: set(experts) for layer, experts in held_experts.items()}
    keep = []
    for name in names:
        owner = expert_of(name)
        if owner is None or owner[1] in held.get(owner[0], ()):
            keep.append(name)
    return keep
