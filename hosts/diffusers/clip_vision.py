"""A transformers ``CLIPVisionModelWithProjection`` as SeedSelect's ``ImageEncoder`` (CLI, tests).

``load`` reads a local folder only (``config.json`` + weights, optionally
``preprocessor_config.json`` for the input size and normalisation), never the Hub.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ...trainers.image_encoder import CLIP_MEAN, CLIP_STD, clip_pixels
from .folder import offline


class HFClipVision:
    """``embed(images)`` = ``image_embeds`` of the model on ``clip_pixels(images)``; differentiable.
    The model is frozen (eval, ``requires_grad`` off) in place."""

    def __init__(self, model, *, size: int | None = None, mean=CLIP_MEAN, std=CLIP_STD,
                 dtype: torch.dtype | None = None):
        self.model = model.eval().requires_grad_(False)
        self.size = int(size or model.config.image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        p = next(model.parameters())
        self.device, self.dtype = p.device, dtype or p.dtype

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pv = clip_pixels(images.to(self.device).float(), self.size, self.mean, self.std)
        out = self.model(pixel_values=pv.to(self.dtype))
        return out.image_embeds.float()


def _preprocessor(folder: Path) -> dict:
    f = folder / "preprocessor_config.json"
    if not f.is_file():
        return {}
    cfg = json.loads(f.read_text())
    out = {}
    crop = cfg.get("crop_size") or cfg.get("size")
    if isinstance(crop, dict):
        crop = crop.get("height") or crop.get("shortest_edge")
    if crop:
        out["size"] = int(crop)
    if cfg.get("image_mean"):
        out["mean"] = cfg["image_mean"]
    if cfg.get("image_std"):
        out["std"] = cfg["image_std"]
    return out


def load(folder, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> HFClipVision:
    """A CLIP vision model with projection from a local folder (e.g. a download of
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` or ``openai/clip-vit-large-patch14``)."""
    from transformers import CLIPVisionModelWithProjection

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a CLIP vision model folder (no config.json); give the folder of a "
                         "CLIPVisionModelWithProjection or a full CLIPModel saved with save_pretrained")
    with offline():
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a CLIP vision model from {folder} ({e})") from e
    model = model.to(device, dtype)
    return HFClipVision(model, dtype=dtype, **_preprocessor(folder))


__all__ = ["HFClipVision", "load"]
