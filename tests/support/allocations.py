"""Counting the weight-sized tensors a training step allocates (the fast-path tests)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class WeightSized(TorchDispatchMode):
    """While active, records every op that returns a *new* tensor (not a view of one of its
    inputs, such as a transposed weight) shaped like one of ``shapes`` (the model's weights): a
    per-step copy of a weight shows up here, an activation practically never does."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.hits = {tuple(s) for s in shapes}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes \
                    and t.untyped_storage().data_ptr() not in seen:
                self.hits.append(str(func))
        return out
