"""The shapes world's text tower: what a real CLIP has and the world lacked, so that CLIP-T (prompt
fidelity, ``trainers/metrics.py``) is measured in the world as it is with a real CLIP.

A CLIP text embedding is trained to sit where the images its caption describes sit in the image
embedding space.  The world has no such training, but it has the renderer: the text embedding of
a prompt is the prototype of the images it describes - the mean of the (normalised) classifier
embeddings of ``SAMPLES`` renders that show every attribute the prompt states, the attributes it
leaves unsaid drawn at random.  So its partner image tower is exactly ``WorldImageEncoder`` (same
classifier, same preprocessing: renders box-filtered to the model's resolution, as the references
are), and both carry the same ``tower`` tag, which is what ``metrics.check_same_tower`` asks for.

The class noun of a world concept is the name of its attribute ("shape" for moon, "pattern" for
checked): CLIP-T scores "a large red sks-moon on a blue background" as "a large red shape on a
blue background", a prompt that says nothing about the shape, just as the classifier's prompt
fidelity (``world/metrics.py``) leaves the concept's attribute out.  Words the world does not know
(a placeholder such as "sks-moon") say nothing, as with any unknown word.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import render as R
from .model import RESOLUTION

#: the tag both world towers carry
TOWER = "shapes-world-classifier"
#: renders averaged per prompt: enough that the unsaid attributes average out (on the moon
#: references' prompts the prototypes of 32 and of 64 renders have cosine > 0.998)
SAMPLES = 32
#: the attributes a world concept belongs to; their names are the concepts' class nouns
CLASS_NOUNS = tuple(sorted(set(R.NEW_CONCEPTS.values()) | {R.RARE_CONCEPT[0]}))


def class_noun(concept: str) -> str:
    """The class noun of a world concept: its attribute's name ("moon" -> "shape")."""
    from .metrics import concept_attribute

    return concept_attribute(concept)


def stated(prompt: str) -> dict:
    """The attributes a prompt states; a class noun ("shape", "pattern") states that there is one,
    not which, so it constrains nothing (not even "solid")."""
    attrs = R.parse_caption(prompt)
    nouns = set(CLASS_NOUNS) & set(prompt.replace(",", " ").split())
    return {k: v for k, v in attrs.items() if k not in nouns}


def scenes_for(attrs: dict, n: int, seed: int) -> list:
    """``n`` valid scenes showing ``attrs``, the other attributes drawn at random from every value."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(200 * n):
        if len(out) == n:
            break
        base = R.sample_scene(rng, "all").as_dict()
        if attrs.get("count") == "one" and "size" not in attrs:
            base["size"] = R.SIZES[rng.integers(len(R.SIZES))]
        try:
            out.append(R.Scene(**{**base, **attrs}))
        except ValueError:  # e.g. colour == background, two large shapes: draw again
            continue
    if len(out) < n:
        raise ValueError(f"no scene shows {attrs} (e.g. a colour equal to the background)")
    return out


def render_model_size(scenes) -> torch.Tensor:
    """Renders box-filtered to the model's resolution, IMAGE ``[N, H, W, 3]`` (as the references)."""
    imgs = torch.stack([torch.from_numpy(np.asarray(R.render(s), np.float32) / 255.0) for s in scenes])
    small = F.avg_pool2d(imgs.permute(0, 3, 1, 2), imgs.shape[1] // RESOLUTION)
    return small.permute(0, 2, 3, 1).contiguous()


class WorldTextEncoder:
    """``metrics.TextEncoder`` of the world: a prompt -> the prototype embedding of the images it
    describes (module docstring).  Deterministic: each prompt's renders are seeded by what it states."""

    tower = TOWER

    def __init__(self, image_encoder=None, samples: int = SAMPLES):
        from .quality_seedselect import WorldImageEncoder

        self.image_encoder = image_encoder or WorldImageEncoder()
        self.samples = samples
        self._cache: dict[str, torch.Tensor] = {}

    def _prototype(self, attrs: dict) -> torch.Tensor:
        key = repr(sorted(attrs.items()))
        if key not in self._cache:
            images = render_model_size(scenes_for(attrs, self.samples, zlib.crc32(key.encode())))
            with torch.no_grad():
                emb = F.normalize(self.image_encoder.embed(images).float(), dim=-1)
            self._cache[key] = emb.mean(0)
        return self._cache[key]

    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.stack([self._prototype(stated(p)) for p in prompts])


__all__ = ["TOWER", "SAMPLES", "CLASS_NOUNS", "class_noun", "stated", "scenes_for", "render_model_size", "WorldTextEncoder"]
