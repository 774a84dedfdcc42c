"""Preview images while training: the prompt with the new word, sampled by the frozen model (Euler,
CFG) at a fixed seed, so previews from different steps are comparable."""
from __future__ import annotations

import torch

from . import data as D
from .diff_sampling import sample_euler
from .seam import Host


def render_preview(host: Host, name: str, vectors: dict[str, torch.Tensor] | None, prompt: str,
                   *, size_hw: tuple[int, int], steps: int, cfg: float, seed: int,
                   count: int = 1) -> torch.Tensor:
    """Images [count, H, W, 3] for ``prompt`` with the placeholder spliced in (or, with vectors
    None, the prompt as the model reads it without them).  A fixed seed makes previews from
    different steps comparable."""
    text = prompt.format(name) if "{}" in prompt else prompt
    f = host.latent_scale
    shape = (count, host.latent_channels, size_hw[0] // f, size_hw[1] // f)
    meta = [D.ImageMeta(size_hw, (0, 0), size_hw)] * count
    with torch.no_grad():
        vecs = {k: v.detach() for k, v in vectors.items()} if vectors else None
        cond = host.encode_text([text] * count, name if vecs else None, vecs, meta)
        uncond = host.encode_text([""] * count, None, None, meta)
        lat = sample_euler(host, cond, uncond, shape=shape, steps=steps, cfg=cfg, seed=seed)
        return host.decode_latents(lat)


__all__ = ["render_preview"]
