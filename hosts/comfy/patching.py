"""What makes ComfyUI's modules trainable without changing them: identity weight/bias wrappers on
patcher clones, an out-of-place ``CLIPLayer`` forward, and gradient checkpointing of UNet blocks.

Why each exists (ComfyUI runs nodes under ``torch.inference_mode()``; see ``hosts/comfy/host.py``):

* The loaded weights are inference tensors, which autograd refuses to save for backward.  Any
  weight wrapper on a patcher makes ComfyUI's ops copy the weight per forward
  (``comfy/ops.py`` ``cast_bias_weight``, ``copy=True``); wrappers on weights *and* biases are
  needed (``LayerNorm`` saves its bias).  The wrappers go on clones, so the input objects and the
  modules they share with the clones are never modified.
* ``comfy.clip_model.CLIPLayer.forward`` adds its residuals in place, which breaks backward through
  the text encoder and the CLIP vision tower; ``out_of_place_clip_layers`` swaps in an out-of-place
  forward for a block and restores the original in ``finally``.
* The UNet blocks are shared with every other clone of the MODEL, so checkpointing patches their
  ``forward`` only for the duration of a block and restores it in ``finally`` (ComfyUI's
  ``InterruptProcessingException`` may end the block at any forward).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.utils.checkpoint as ckpt

import comfy.clip_model

from ..shared import checkpointed_forwards, unet_blocks


class PatchableWrapper:
    """Weight/bias wrapper that always returns a tensor of its own, patched when a trainer asks.

    Under DynamicVRAM the cast weight can be a cached resident tensor made in inference mode, or a
    view into a cast buffer that the next layer overwrites; cloning (outside inference mode) gives
    autograd a stable, ordinary tensor.  ``patches`` is the owner's live dict
    (``ComfyHost.parameter_patches``): a LoRA or a full fine-tune's delta enters here, on the clone
    only, never in the stored weight."""

    def __init__(self, key: str, patches: dict):
        self.key, self.patches = key, patches

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        fn = self.patches.get(self.key)
        return fn(t) if fn is not None else t


def add_identity_wrappers(patcher, patches: dict | None = None) -> None:
    """Give every weight and bias of ``patcher``'s ComfyUI-op layers a ``PatchableWrapper`` reading
    ``patches`` (none: identity copies only, for users that train no weights).  ``patcher`` must be
    a clone the caller owns."""
    patches = {} if patches is None else patches
    for name, m in patcher.model.named_modules():
        if hasattr(m, "weight_function"):
            for pname in ("weight", "bias"):
                if getattr(m, pname, None) is not None:
                    key = f"{name}.{pname}"
                    patcher.add_weight_wrapper(key, PatchableWrapper(key, patches))


def _clip_layer_body(self, x, mask=None, optimized_attention=None):
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


#: set while a host trains with gradient checkpointing: text-encoder layers are recomputed in
#: backward too (each forward otherwise keeps a copy of every patched weight it used)
_CHECKPOINT_TEXT = {"on": False}


def _clip_layer_forward_out_of_place(self, x, mask=None, optimized_attention=None):
    if _CHECKPOINT_TEXT["on"] and torch.is_grad_enabled():
        return ckpt.checkpoint(_clip_layer_body, self, x, mask, optimized_attention, use_reentrant=False)
    return _clip_layer_body(self, x, mask, optimized_attention)


@contextlib.contextmanager
def out_of_place_clip_layers() -> Iterator[None]:
    """Swap ``comfy.clip_model.CLIPLayer.forward`` for one without in-place residual adds while the
    block runs; the original is restored in ``finally``.  Re-entrant."""
    cls = comfy.clip_model.CLIPLayer
    original = cls.__dict__["forward"]
    if original is _clip_layer_forward_out_of_place:
        yield
        return
    cls.forward = _clip_layer_forward_out_of_place
    try:
        yield
    finally:
        cls.forward = original


@contextlib.contextmanager
def checkpointed_blocks(unet) -> Iterator[None]:
    """Recompute each block of ComfyUI's ``UNetModel`` (and, through the out-of-place CLIP layers,
    each text-encoder layer) in backward while the block runs; the shared modules get their own
    ``forward`` back in ``finally``."""
    with checkpointed_forwards(unet_blocks(unet)):
        _CHECKPOINT_TEXT["on"] = True
        try:
            yield
        finally:
            _CHECKPOINT_TEXT["on"] = False

__all__ = ["PatchableWrapper", "add_identity_wrappers", "out_of_place_clip_layers", "checkpointed_blocks"]
