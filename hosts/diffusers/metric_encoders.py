"""The metrics' encoders from local transformers folders (the CLI's ``--clip DIR`` and ``--dino DIR``):
a CLIP vision model for CLIP-I, the text tower of the *same* CLIP model for CLIP-T when the folder
holds a full ``CLIPModel``, and a DINOv2 model for DINO.  Local folders only, never the Hub.

Both towers of one folder carry the same ``tower`` tag (the folder's resolved path), so
``trainers.metrics`` accepts them together and refuses a text tower from anywhere else.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ...trainers.best_step import Encoders
from ...trainers.image_encoder import CLIP_MEAN, CLIP_STD, clip_pixels
from .clip_vision import _preprocessor
from .clip_vision import load as load_clip_vision
from .folder import offline

#: DINOv2's normalisation (ImageNet's) and input size
DINO_MEAN = (0.485, 0.456, 0.406)
DINO_STD = (0.229, 0.224, 0.225)


def _config(folder: Path, what: str) -> dict:
    f = folder / "config.json"
    if not f.is_file():
        raise ValueError(f"{folder} is not a {what} folder (no config.json); give a local transformers folder "
                         "saved with save_pretrained")
    return json.loads(f.read_text())


class HFClipImage:
    """The image tower of a full ``CLIPModel``: ``embed(images)`` = ``visual_projection`` of the
    vision model's pooled output (what ``CLIPModel.get_image_features`` computes), differentiable."""

    def __init__(self, model, tower: str, size: int | None = None, mean=CLIP_MEAN, std=CLIP_STD):
        self.model, self.tower = model.eval().requires_grad_(False), tower
        self.size = int(size or model.config.vision_config.image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pv = clip_pixels(images.to(self.device).float(), self.size, self.mean, self.std)
        pooled = self.model.vision_model(pixel_values=pv.to(self.dtype)).pooler_output
        return self.model.visual_projection(pooled).float()


class HFClipText:
    """The text tower of the same ``CLIPModel``: ``embed_text(prompts)`` = ``text_projection`` of
    the text model's pooled output, with the folder's tokenizer."""

    def __init__(self, model, tokenizer, tower: str):
        self.model, self.tokenizer, self.tower = model, tokenizer, tower
        self.device = next(model.parameters()).device

    def embed_text(self, prompts) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        with torch.no_grad():
            pooled = self.model.text_model(input_ids=tok.input_ids.to(self.device)).pooler_output
            return self.model.text_projection(pooled).float()


class HFDino:
    """A transformers DINOv2 model: ``embed(images)`` = the class token after the last norm
    (``pooler_output``), what DreamBooth's DINO metric compares."""

    tower = "dinov2"

    def __init__(self, model, size: int = 224, mean=DINO_MEAN, std=DINO_STD):
        self.model = model.eval().requires_grad_(False)
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pv = clip_pixels(images.to(self.device).float(), self.size, self.mean, self.std)
        return self.model(pixel_values=pv.to(self.dtype)).pooler_output.float()


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("vocab.json", "tokenizer.json"))


def load_clip(folder, device="cpu"):
    """The image encoder of ``folder`` and, for a full ``CLIPModel`` with its tokenizer
    (``vocab.json`` or ``tokenizer.json``), its text tower (None otherwise: CLIP-T is then reported unavailable).  A
    vision-only folder (``CLIPVisionModelWithProjection``) loads as SeedSelect's encoder does."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = Path(folder).resolve()
    if _config(folder, "CLIP model").get("model_type") != "clip":
        image = load_clip_vision(folder, device)
        image.tower = f"hf:{folder}"
        return image, None
    with offline():
        try:
            model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device)
            tok = (CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
                   if _has_tokenizer(folder) else None)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a CLIP model from {folder} ({e})") from e
    tower = f"hf:{folder}"
    image = HFClipImage(model, tower, **_preprocessor(folder))
    return image, (HFClipText(model, tok, tower) if tok is not None else None)


def load_dino(folder, device="cpu") -> HFDino:
    from transformers import Dinov2Model

    folder = Path(folder).resolve()
    if _config(folder, "DINOv2 model").get("model_type") != "dinov2":
        raise ValueError(f"{folder} is not a DINOv2 model (config.json model_type is not 'dinov2')")
    with offline():
        try:
            model = Dinov2Model.from_pretrained(str(folder), local_files_only=True).to(device)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a DINOv2 model from {folder} ({e})") from e
    pre = _preprocessor(folder)
    return HFDino(model, pre.get("size", 224), pre.get("mean", DINO_MEAN), pre.get("std", DINO_STD))


def load_encoders(clip_dir, dino_dir=None, device="cpu") -> Encoders:
    """``--clip`` (+ ``--dino``) as the metrics' encoders."""
    image, text = load_clip(clip_dir, device)
    return Encoders(image, load_dino(dino_dir, device) if dino_dir else None, text)


__all__ = ["HFClipImage", "HFClipText", "HFDino", "load_clip", "load_dino", "load_encoders"]
