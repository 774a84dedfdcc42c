"""Training images and their prompts: loading, validation, templates, crops, flips, latent cache.

Everything that can be wrong with a user's images is found here, before any model work starts, and
reported in one message that names the files and says what to change.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .seam import Host, ImageMeta

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")

# Textual Inversion paper / diffusers / kohya / A1111 `subject.txt` (algorithms.md §1.3).
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}",
    "a cropped painting in the style of {}", "the painting in the style of {}",
    "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a good painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
TEMPLATE_KINDS = ("auto", "object", "style", "captions")
#: A1111 caption convention; we accept it so WebUI datasets work unchanged.
NAME_TAG = "[name]"


#: Seeds are ComfyUI's (0 .. 2**64 - 1): what a torch generator accepts.
MAX_SEED = 2**64 - 1
#: Largest training side in pixels: SDXL trains at 1024; 4096 already needs tens of GB.  Beyond
#: it a typo (100000) would try to allocate hundreds of GB before any message could be shown.
MAX_RESOLUTION = 4096


class DatasetError(ValueError):
    """Bad training data; the message says which files and what to change."""


def offset_seed(seed: int, k: int) -> int:
    """``seed + k`` wrapped into the seed range: a seed near the top (ComfyUI offers up to
    2**64 - 1) must not overflow the generator when a run derives its other seeds from it."""
    return (seed + k) % (MAX_SEED + 1)


def number_problems(seed: int, resolution: int | None) -> list[str]:
    """The checks of a seed and a training resolution that every trainer's config shares, as
    messages: run with the other option checks, before any model is loaded."""
    p = []
    if not 0 <= seed <= MAX_SEED:
        p.append(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed}")
    if resolution is not None and (not 64 <= resolution <= MAX_RESOLUTION or resolution % 8):
        p.append(f"resolution must be a multiple of 8 from 64 to {MAX_RESOLUTION} pixels (512 for SD1, "
                 f"1024 for SDXL), got {resolution}")
    return p


@dataclass
class TrainingImages:
    """RGB images in [0, 1] as [H, W, 3] float tensors, with optional per-image captions."""

    images: list[torch.Tensor]
    captions: list[str | None]
    sources: list[str]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def summary(self) -> str:
        sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in self.images})
        n_cap = sum(c is not None for c in self.captions)
        lines = [f"{len(self)} images, sizes {', '.join(sizes)}, {n_cap} with captions"]
        lines += [f"  {s}: {c!r}" for s, c in zip(self.sources, self.captions) if c is not None]
        return "\n".join(lines + self.notes)


def _png_bit_depth(path: Path) -> int | None:
    # Pillow silently reduces 48/64-bit PNGs to 8 bits per channel; the IHDR header tells the truth.
    with open(path, "rb") as fh:
        head = fh.read(26)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
    return None


def _image_problem(path: Path, img: Image.Image) -> str | None:
    """Why this image cannot be used as-is, or None.  We refuse rather than guess a conversion:
    flattening transparency or widening grayscale changes what the model is taught."""
    if path.suffix.lower() == ".png" and (_png_bit_depth(path) or 8) > 8:
        return "is 16 bits per channel: save it as 8-bit RGB"
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return f"is a {img.mode} (16/32-bit single-channel) image: save it as 8-bit RGB"
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return "has an alpha channel: flatten it onto a background and save as RGB"
    if img.mode in ("L", "1"):
        return "is grayscale: save it as RGB (Likeness trains on colour images)"
    if img.mode == "CMYK":
        return "is CMYK: save it as RGB"
    if img.mode not in ("RGB", "P", "YCbCr"):
        return f"has unsupported mode {img.mode}: save it as 8-bit RGB"
    return None


def _read_caption(image_path: Path) -> str | None:
    for ext in CAPTION_EXTENSIONS:
        cap = image_path.with_suffix(ext)
        if cap.is_file():
            text = " ".join(cap.read_text(encoding="utf-8").split())
            return text or None
    return None


def load_image_folder(folder: str | Path) -> TrainingImages:
    """Images in ``folder`` (sorted by name) with captions from same-named .txt/.caption files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist or is not a folder")
    named = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    # a link that loops or points nowhere is not a file; said, not skipped, since the user meant it
    dangling = [f"{p.name} is a symbolic link that loops or points to nothing: fix or remove it"
                for p in named if p.is_symlink() and not p.exists()]
    paths = [p for p in named if p.is_file()]
    if not paths and not dangling:
        raise DatasetError(f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    images, captions, problems = [], [], dangling
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
                problem = _image_problem(path, img)
                rgb = None if problem else img.convert("RGB")
        except Image.DecompressionBombError as exc:
            problem = f"is too large to open safely ({exc}): downscale it"
        except OSError as exc:
            problem = f"cannot be read ({exc})"
        if problem:
            problems.append(f"{path.name} {problem}")
            continue
        images.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0))
        captions.append(_read_caption(path))
    if problems:
        raise DatasetError("some training images cannot be used:\n  " + "\n  ".join(problems))
    return TrainingImages(images, captions, [p.name for p in paths])


def images_from_batch(batch: torch.Tensor, captions: Sequence[str | None] | None = None) -> TrainingImages:
    """A ComfyUI IMAGE batch [B, H, W, C] in [0, 1] (one size by construction)."""
    if batch is None or batch.ndim != 4 or batch.shape[0] == 0:
        raise DatasetError("no training images: connect an IMAGE batch with 1 or more images")
    channels = batch.shape[-1]
    if channels != 3:
        kind = {1: "grayscale", 4: "RGBA (with alpha)", 2: "grayscale+alpha"}.get(channels, f"{channels}-channel")
        raise DatasetError(f"the IMAGE batch is {kind}; convert it to RGB (3 channels) first")
    if not torch.isfinite(batch).all():
        raise DatasetError("the IMAGE batch contains NaN or infinite pixels")
    caps = list(captions) if captions is not None else [None] * batch.shape[0]
    if len(caps) != batch.shape[0]:
        raise DatasetError(f"{len(caps)} captions for {batch.shape[0]} images: give one caption line per image")
    imgs = [batch[i].detach().clone().float().clamp(0, 1).cpu() for i in range(batch.shape[0])]
    return TrainingImages(imgs, caps, [f"image {i}" for i in range(len(imgs))])


def resolve_prompts(data: TrainingImages, name: str, kind: str) -> tuple[str, list[str | None]]:
    """Decide what text each image is trained with.  Returns (kind used, per-image captions or
    None when templates are used).  Captions are never ignored silently: "auto" uses them when
    every image has one, and a caption without the placeholder is an error, not a skip."""
    if kind not in TEMPLATE_KINDS:
        raise DatasetError(f"template kind must be one of {', '.join(TEMPLATE_KINDS)}, got {kind!r}")
    have = [c is not None for c in data.captions]
    if kind == "auto":
        kind = "captions" if all(have) else "object"
        if any(have) and not all(have):
            missing = [s for s, h in zip(data.sources, have) if not h]
            raise DatasetError(
                "only some images have captions (missing: " + ", ".join(missing)
                + "); caption every image, or choose template kind 'object' or 'style' to ignore captions"
            )
    if kind != "captions":
        if any(have):
            data.notes.append(f"captions present but template kind '{kind}' chosen: captions not used")
        return kind, [None] * len(data)
    if not all(have):
        missing = [s for s, h in zip(data.sources, have) if not h]
        raise DatasetError("template kind 'captions' but these images have no caption: " + ", ".join(missing))
    captions = [c.replace(NAME_TAG, name) for c in data.captions]  # type: ignore[union-attr]
    lacking = [s for s, c in zip(data.sources, captions) if name not in c]
    if lacking:
        raise DatasetError(
            f"captions must contain the placeholder '{name}' (or {NAME_TAG}) so the new word is "
            f"learned; missing in: " + ", ".join(lacking)
        )
    return kind, captions


def _resize_short_side(img: torch.Tensor, short: int) -> torch.Tensor:
    h, w = img.shape[:2]
    scale = short / min(h, w)
    size = (max(short, round(h * scale)), max(short, round(w * scale)))
    if size == (h, w):
        return img
    x = img.permute(2, 0, 1)[None]
    x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0).clamp(0, 1)


def resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """An [H, W, 3] image with its short side resized to ``size`` (bicubic, antialiased) and the
    long side centre-cropped: a ``size`` x ``size`` square, as the image-folder node outputs it."""
    if size < 1:
        raise DatasetError(f"resolution must be a positive number of pixels, got {size}")
    img = _resize_short_side(img, size)
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return img[top:top + size, left:left + size]


def cover_crop(img: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """An [H, W, 3] image resized (bicubic, antialiased) just enough to cover ``size_hw`` and
    centre-cropped to it; returned as is when it already has that size."""
    th, tw = size_hw
    h, w = img.shape[:2]
    if (h, w) == (th, tw):
        return img
    img = _resize_short_side(img, math.ceil(min(h, w) * max(th / h, tw / w)))
    h, w = img.shape[:2]
    top, left = (h - th) // 2, (w - tw) // 2
    return img[top:top + th, left:left + tw]


def plan_geometry(data: TrainingImages, resolution: int | None, factor: int) -> list[torch.Tensor]:
    """Images ready to encode.  With a resolution, the short side is resized to it (the square
    crop happens per step in latent space); without one, every image must already share one size,
    trimmed down to a multiple of the latent factor."""
    if resolution is None:
        sizes = {tuple(im.shape[:2]) for im in data.images}
        if len(sizes) > 1:
            listing = ", ".join(f"{s} {im.shape[1]}x{im.shape[0]}" for s, im in zip(data.sources, data.images))
            raise DatasetError(f"images have different sizes ({listing}); set a resolution to resize them to")
        h, w = sizes.pop()
        if max(h, w) > MAX_RESOLUTION:
            raise DatasetError(f"images are {w}x{h}, larger than {MAX_RESOLUTION} pixels on a side; set a "
                               "resolution (e.g. 512 or 1024) to downscale them")
        h8, w8 = h - h % factor, w - w % factor
        if min(h8, w8) < 8 * factor:
            raise DatasetError(f"images are {w}x{h}; they must be at least {8 * factor} pixels on each side")
        return [im[:h8, :w8] for im in data.images]
    if resolution % factor or resolution < 8 * factor:
        raise DatasetError(f"resolution must be a multiple of {factor} and at least {8 * factor}, got {resolution}")
    return [_resize_short_side(im, resolution) for im in data.images]


class LatentCache:
    """Every training image encoded once (and its mirror image when flipping), then cropped in
    latent space each step.  A VAE latent is local (one latent pixel per 8x8 pixels), so a latent
    crop matches encoding the pixel crop closely while the VAE runs only once per image."""

    def __init__(self, host: Host, images: list[torch.Tensor], *, crop_hw: tuple[int, int],
                 flip: bool, random_crop: bool):
        self.factor = host.latent_scale
        self.crop = (crop_hw[0] // self.factor, crop_hw[1] // self.factor)
        self.random_crop = random_crop
        self.sizes = [tuple(im.shape[:2]) for im in images]
        self.latents: list[list[torch.Tensor]] = []
        for im in images:
            variants = [im, im.flip(1)] if flip else [im]
            self.latents.append([host.encode_images(v[None].to(host.device))[0] for v in variants])

    @classmethod
    def from_latents(cls, latents: torch.Tensor, factor: int) -> "LatentCache":
        """Latents that need no encoding (e.g. class images the model itself sampled), used whole."""
        self = cls.__new__(cls)
        self.factor = factor
        self.crop = tuple(latents.shape[-2:])
        self.random_crop = False
        self.sizes = [(latents.shape[-2] * factor, latents.shape[-1] * factor)] * latents.shape[0]
        self.latents = [[lat] for lat in latents]
        return self

    def __len__(self) -> int:
        return len(self.latents)

    def sample(self, batch_size: int, rng: random.Random) -> tuple[torch.Tensor, list[int], list[ImageMeta]]:
        """A batch of latent crops, the source image index of each, and SDXL size conditioning."""
        xs, idx, metas = [], [], []
        ch, cw = self.crop
        for _ in range(batch_size):
            i = rng.randrange(len(self.latents))
            lat = self.latents[i][rng.randrange(len(self.latents[i]))]
            h, w = lat.shape[-2:]
            if self.random_crop:
                top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            else:
                top, left = (h - ch) // 2, (w - cw) // 2
            xs.append(lat[:, top:top + ch, left:left + cw])
            idx.append(i)
            f = self.factor
            metas.append(ImageMeta(self.sizes[i], (top * f, left * f), (ch * f, cw * f)))
        return torch.stack(xs), idx, metas


def prompt_for(kind: str, name: str, caption: str | None, rng: random.Random) -> str:
    """A fresh template each step (paper/diffusers), or the image's own caption."""
    if kind == "captions":
        assert caption is not None
        return caption
    templates = STYLE_TEMPLATES if kind == "style" else OBJECT_TEMPLATES
    return rng.choice(templates).format(name)
