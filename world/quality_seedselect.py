"""SeedSelect's row in the quality benchmark: the rare concept ("diamond", 0.5 % of training).

SeedSelect teaches nothing to the model: for each test prompt it looks for an initial noise whose
sample matches the references (semantically — an image embedding — and in appearance — the VAE
latents).  So its "training" is per prompt, inside ``sample``, and the row's train time is the sum
over the test prompts.  The image embedding is the world classifier's (what the benchmark's feature
similarity uses too), through a differentiable resize: CLIP knows nothing of this world.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from . import classifier as C
from .model import RESOLUTION
from .quality import Learned, References, register
from .text_tower import TOWER


class WorldImageEncoder:
    """``trainers.image_encoder.ImageEncoder`` over the world classifier's 128-d embedding (the
    pre-activation layer ``metrics.embed`` reads), differentiable in the pixels.  Its text tower
    (CLIP-T in the world) is ``world.text_tower.WorldTextEncoder``, which carries the same tag."""

    tower = TOWER

    def __init__(self, model=None):
        self.model = (model or C.load_classifier()).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        # the classifier's own preprocessing (a bilinear resize to 64 px: differentiable)
        return self.model.body[:-1](C.images_to_tensor(images[..., :3].movedim(-1, 1)))


@register("seedselect", "SeedSelect: a noise optimised per prompt toward the references")
def seedselect_method(host, refs: References, concept: str, out_dir: Path, opts: dict) -> Learned:
    from ..trainers.seedselect import SeamSeedModel, SeedSelectConfig, train_seedselect

    cfg = SeedSelectConfig(width=RESOLUTION, height=RESOLUTION, sampler="euler", scheduler="normal",
                           steps=opts.get("sample_steps", 25), cfg=4.0,
                           iterations=opts.get("ss_iterations", 3), start="best_of",
                           candidates=opts.get("ss_candidates", 8))
    encoder = WorldImageEncoder()
    learned = Learned(word=concept, sample=None, seconds=0.0, steps=cfg.iterations,
                      note=f"best of {cfg.candidates} seeds, then {cfg.iterations} iterations per prompt, "
                           f"lr {cfg.learning_rate}; Euler {cfg.steps}, CFG {cfg.cfg}")

    def sample(prompts: list[str], seed: int) -> torch.Tensor:
        t0, images = time.perf_counter(), []
        for i, prompt in enumerate(prompts):
            res = train_seedselect(SeamSeedModel(host, prompt), encoder, refs.images_model,
                                   replace(cfg, seed=seed + i))
            images.append(res.images[:1].float())
        learned.seconds = time.perf_counter() - t0       # SeedSelect's work is all per prompt
        return torch.cat(images)

    learned.sample = sample
    return learned
