"""A saved SeedSelect seed in the WebUI's own txt2img: the **Likeness seed** section (an always-on
script, ``scripts/likeness_webui.py``) replaces the first noise the sampler draws with the saved
noise.  Both WebUIs build ``p.rng`` (their ``ImageRNG``) before the scripts' ``process_batch`` hook
and draw the starting noise from it with ``next()``; the wrapper answers the first ``next()`` with
the seed and every later one (ancestral samplers' per-step noise) from the WebUI's own generator,
which is advanced in step so those later draws are what they would have been."""
from __future__ import annotations

from pathlib import Path

import torch

from ..trainers import seed_bank as B

#: the dropdown's "off" entry
NONE = "None"


class FirstNoiseFromSeed:
    """``p.rng`` with its first draw replaced by ``noise`` ([n, C, h, w], repeated over the batch)."""

    def __init__(self, original, noise: torch.Tensor):
        self.original, self.noise, self.used = original, noise, False

    def next(self) -> torch.Tensor:
        drawn = self.original.next()
        if self.used:
            return drawn
        self.used = True
        picks = [self.noise[i % len(self.noise)] for i in range(drawn.shape[0])]
        return torch.stack(picks).to(device=drawn.device, dtype=drawn.dtype)

    def __getattr__(self, name):
        return getattr(self.original, name)


def choices(folder: Path) -> list[str]:
    return [NONE, *B.list_seeds(folder)]


def apply(p, name: str, folder: Path) -> None:
    """Use the seed ``name`` for processing ``p`` (``NONE`` or empty: leave ``p`` as it is).  A seed
    made for another size is refused with the size it needs, before anything is sampled."""
    if not name or name == NONE:
        return
    entry = B.load_seed(folder, name)
    want = tuple(int(v) for v in p.rng.shape)
    have = tuple(entry.noise.shape[1:])
    if have != want:
        size = f"{entry.width}x{entry.height} px" if entry.width else f"a {have[-1]}x{have[-2]} latent"
        raise ValueError(f"Likeness seed {name!r} was made for {size}; set the width and height to that "
                         f"(this generation's latent is {want[-1]}x{want[-2]})")
    p.rng = FirstNoiseFromSeed(p.rng, entry.noise.float())
    p.extra_generation_params["Likeness seed"] = name


__all__ = ["FirstNoiseFromSeed", "apply", "choices", "NONE"]
