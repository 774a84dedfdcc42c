"""The model families Likeness knows, in one table: every module that needs to know what an SD1.x,
SD2.x or SDXL model looks like (text encoders and widths, latent shape, file-format names) reads
it here instead of keeping its own copy.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Encoder:
    """One text encoder of a family.

    ``key`` names it in files and in ``vectors`` dicts (``clip_l``: OpenAI CLIP ViT-L,
    ``clip_h``: OpenCLIP ViT-H, ``clip_g``: OpenCLIP bigG); ``component`` is the diffusers pipeline
    attribute; ``kohya`` the prefix of its LoRA keys in kohya's naming."""

    key: str
    width: int
    component: str
    kohya: str


@dataclass(frozen=True)
class Family:
    name: str  # "sd1", "sd2", "sdxl"
    title: str  # how messages name it
    encoders: tuple[Encoder, ...]
    latent_channels: int
    latent_scale: int  # pixels per latent cell
    base_model_version: str  # kohya's ss_base_model_version
    config_folder: str  # shipped diffusers configs under hosts/assets

    @property
    def encoder_keys(self) -> tuple[str, ...]:
        return tuple(e.key for e in self.encoders)

    def encoder(self, key: str) -> Encoder:
        for e in self.encoders:
            if e.key == key:
                return e
        raise KeyError(f"{self.title} has no {key} text encoder (it has {', '.join(self.encoder_keys)})")


_CLIP_L = Encoder("clip_l", 768, "text_encoder", "lora_te")
FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "SD1.x", (_CLIP_L,), 4, 8, "sd_v1", "sd15"),
    "sd2": Family("sd2", "SD2.x", (Encoder("clip_h", 1024, "text_encoder", "lora_te"),), 4, 8, "sd_v2", "sd2"),
    "sdxl": Family("sdxl", "SDXL", (Encoder("clip_l", 768, "text_encoder", "lora_te1"),
                                    Encoder("clip_g", 1280, "text_encoder_2", "lora_te2")), 4, 8,
                   "sdxl_base_v1-0", "sdxl"),
}

NAMES: tuple[str, ...] = tuple(FAMILIES)

#: Which encoder a lone embedding tensor belongs to, judged by its width (the file does not say).
WIDTH_TO_KEY = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}

SUPPORTED = "Likeness supports SD1.x, SD2.x and SDXL"


def family(name: str) -> Family:
    """The family called ``name``; ValueError naming the ones there are."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; {SUPPORTED} ({', '.join(NAMES)})") from None


__all__ = ["Encoder", "Family", "FAMILIES", "NAMES", "WIDTH_TO_KEY", "SUPPORTED", "family"]
