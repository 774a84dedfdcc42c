"""What more than one host does the same way, whatever program loaded the model: checking a
placeholder's vectors against the text encoders, and recomputing an LDM ``UNetModel``'s blocks in
backward (ComfyUI and both WebUIs keep that layout: ``input_blocks``, ``middle_block``,
``output_blocks``).  Torch only."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.utils.checkpoint as ckpt


def check_vectors(encoders: Sequence, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``vectors`` as ``{key: [n, width]}`` for every encoder (``seam.TextEncoderInfo``); a 1-D
    vector is one token.  Raises ``ValueError`` naming what is missing or mis-shaped."""
    out = {}
    for enc in encoders:
        v = vectors.get(enc.key)
        if v is None:
            raise ValueError(f"vectors for the {enc.key} text encoder are missing (have {sorted(vectors)})")
        if v.ndim == 1:
            v = v[None]
        if v.ndim != 2 or v.shape[-1] != enc.width or v.shape[0] < 1:
            raise ValueError(f"vectors[{enc.key!r}] must be [n, {enc.width}], got {tuple(v.shape)}")
        out[enc.key] = v
    return out


def unet_blocks(unet) -> list[torch.nn.Module]:
    blocks = list(getattr(unet, "input_blocks", [])) + [getattr(unet, "middle_block", None)] \
        + list(getattr(unet, "output_blocks", []))
    return [b for b in blocks if b is not None]


@contextlib.contextmanager
def checkpointed_forwards(blocks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """While active, each block recomputes its activations in backward (when grad is on); the
    blocks, which other users of the model share, get their own ``forward`` back in ``finally``."""
    for b in blocks:
        def fwd(*args, _f=b.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _f(*args, **kwargs)
            return ckpt.checkpoint(_f, *args, use_reentrant=False, **kwargs)

        b.forward = fwd
    try:
        yield
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)


__all__ = ["check_vectors", "unet_blocks", "checkpointed_forwards"]
