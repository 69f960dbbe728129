"""Tensors in Ray's object store, read without a copy.

Ray pickles a torch tensor through `torch.save` and rebuilds it with
`torch.load` on every `ray.get`: a few hundred microseconds of Python a tensor,
in the process that loads (a new NPU, while the instance it joins serves). A
numpy array instead travels as a pickle-5 buffer and is read in place from the
store's shared memory. So weights and KV blocks go in as arrays and come out as
read-only tensor views of that memory; whoever keeps one copies it (a module's
`load_state_dict` does). Dtypes numpy lacks (bfloat16) travel as their bits
with the dtype's name."""

from __future__ import annotations

import warnings

import numpy as np
import ray
import torch

_BITS = {torch.bfloat16: torch.int16}  # dtypes numpy lacks -> a same-width integer numpy has


def to_shared(t: torch.Tensor) -> np.ndarray | tuple[str, np.ndarray]:
    """What to `ray.put` for tensor `t`."""
    t = t.detach().contiguous()
    if t.dtype in _BITS:
        return str(t.dtype).removeprefix("torch."), t.view(_BITS[t.dtype]).numpy()
    return t.numpy()


def from_shared(obj: np.ndarray | tuple[str, np.ndarray]) -> torch.Tensor:
    """A read-only tensor view of what `ray.get` returned for `to_shared`."""
    array, dtype = (obj[1], getattr(torch, obj[0])) if isinstance(obj, tuple) else (np.asarray(obj), None)
    with warnings.catch_warnings():  # read-only by design (the store's memory): all torch's warning says
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        t = torch.from_numpy(array)
    return t if dtype is None else t.view(dtype)


def fetch_shared(refs: dict, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The named tensors (default: all) of a dict of `to_shared` refs, one `ray.get`
    for all: read-only views, to be copied by whoever keeps them."""
    names = list(refs) if names is None else names
    return {n: from_shared(a) for n, a in zip(names, ray.get([refs[n] for n in names]))}
