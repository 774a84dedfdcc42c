"""The image side of SeedSelect's semantic loss: CLIP preprocessing in torch and the target
centroid, for any ``seam.ImageEncoder``.

Implementations of the encoder live with their hosts (ComfyUI's CLIP_VISION, a transformers
``CLIPVisionModelWithProjection``); the trainer sees only ``ImageEncoder``.  Preprocessing is done here, in torch, for both: ComfyUI's own
``clip_preprocess`` rounds pixels to 8 bits, which zeroes the gradient, and a PIL/numpy processor
would cut the graph altogether.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .seam import ImageEncoder

#: OpenAI CLIP's normalisation, used by every SD-era CLIP vision model (and SeedSelect's code)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images: torch.Tensor, size: int, mean: Sequence[float] = CLIP_MEAN,
                std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """``[B, H, W, 3]`` in [0, 1] -> CLIP input ``[B, 3, size, size]``: the short side resized to
    ``size`` (bicubic with antialiasing, as CLIP's processor and ComfyUI do), a centre crop, and
    the channel normalisation.  Differentiable; no 8-bit rounding."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"images must be [B, H, W, 3], got {tuple(images.shape)}")
    x = images[..., :3].movedim(-1, 1)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
        x = F.interpolate(x, size=new_hw, mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def centroid(encoder: ImageEncoder, images: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """SeedSelect's semantic target: the mean of the raw embeddings of ``images``, L2-normalised
    (``[D]``).  No gradients."""
    with torch.no_grad():
        feats = torch.cat([encoder.embed(images[i:i + batch]).float() for i in range(0, len(images), batch)])
    return F.normalize(feats.mean(0), dim=-1)


__all__ = ["clip_pixels", "centroid", "CLIP_MEAN", "CLIP_STD"]
