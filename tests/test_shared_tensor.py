"""Tensors through the object store as arrays: same values back, bfloat16 included,
as read-only views (the store's memory) that a module copies."""

import warnings

import numpy as np
import pytest
import torch

from actors.model.shared_tensor import from_shared, to_shared

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_keeps_dtype_and_values(dtype):
    t = torch.randn(3, 5).to(dtype)
    back = from_shared(to_shared(t))
    assert back.dtype == dtype and torch.equal(back, t)


def test_a_read_only_array_comes_back_as_a_view_without_a_warning():
    a = np.arange(6, dtype=np.float64)
    a.flags.writeable = False  # as ray.get returns arrays from the object store
    with warnings.catch_warnings(record=True) as shown:
        t = from_shared(a)
    assert not [w for w in shown if "not writable" in str(w.message)]
    assert t.data_ptr() == a.ctypes.data  # no copy
    module = torch.nn.Linear(6, 1, bias=False).double()
    module.load_state_dict({"weight": t.view(1, 6)})  # the module keeps its own copy
    assert module.weight.data_ptr() != a.ctypes.data and module.weight.sum().item() == 15.0
