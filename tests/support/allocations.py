"""Counting the weight-sized tensors a training step allocates (the fast-path tests)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


#: the ops a copy of a weight is made with (``.to``, ``.clone``, an empty buffer to copy into)
COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.clone.default, torch.ops.aten.empty_like.default,
          torch.ops.aten.empty_strided.default, torch.ops.aten.new_empty_strided.default}


class WeightSized(TorchDispatchMode):
    """While active, records every copy op (``COPIES``) that returns a *new* tensor (not a view of
    one of its inputs) shaped like one of ``shapes`` (the model's weights): a per-step copy of a
    weight shows up here; matmuls and convolutions, whose outputs may share a tiny weight's shape,
    are not counted."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.hits = {tuple(s) for s in shapes}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if func in COPIES and isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes \
                    and t.untyped_storage().data_ptr() not in seen:
                self.hits.append(str(func))
        return out
