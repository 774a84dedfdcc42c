"""How well the base model draws what it is asked, read by the world classifier.

    python -m likeness.world.evaluate_base [--model world/base_model] [--n 256] [--grid out.png]

Prompts are full captions of held-out train-split scenes with common concepts only (no rare
"diamond"); each image is classified and compared with what its prompt states, per attribute.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import metrics
from .render import caption, grid, sample_scene, render


def common_prompts(n: int, seed: int = 777) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        s = sample_scene(rng, "train")
        if s.shape != "diamond":
            out.append(caption(s))
    return out


@torch.no_grad()
def generate(pipe, prompts, seed=0, steps=25, guidance=4.0, batch=64):
    from diffusers import DDIMScheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        images += pipe(prompts[i:i + batch], height=64, width=64, num_inference_steps=steps,
                       guidance_scale=guidance, generator=g).images
    return images


def main(argv=None):
    from .model import BASE_MODEL_DIR, load_pipeline
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(BASE_MODEL_DIR))
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="write the first 64 samples (with their renders) here")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    pipe = load_pipeline(a.model)
    prompts = common_prompts(a.n)
    images = generate(pipe, prompts, a.seed, a.steps, a.guidance)
    acc = metrics.attribute_accuracy(images, prompts)
    pf = metrics.prompt_fidelity(images, prompts)
    from .render import parse_caption
    from .classifier import predict
    preds = predict(images)
    all_ok = float(np.mean([all(p[k] == v for k, v in parse_caption(t).items()) for p, t in zip(preds, prompts)]))
    res = {"n": a.n, "steps": a.steps, "guidance": a.guidance, "seed": a.seed,
           "per_attribute_accuracy": {k: round(v, 4) for k, v in acc.items()},
           "prompt_fidelity": round(pf, 4), "all_attributes_right": round(all_ok, 4),
           "diversity": round(metrics.diversity(images), 4), "time_s": round(time.time() - t0, 1)}
    print(json.dumps(res, indent=1))
    if a.grid:
        from .render import Scene
        refs = []
        for t in prompts[:32]:
            d = parse_caption(t)
            refs.append(render(Scene(**d)))
        rows = []
        for r in range(4):
            rows += refs[r * 8:(r + 1) * 8] + images[r * 8:(r + 1) * 8]
        grid(rows, cols=8).resize((8 * 128, 8 * 128), 0).save(a.grid)
        Path(a.grid).with_suffix(".txt").write_text("\n".join(prompts[:32]) + "\n")
    return res


if __name__ == "__main__":
    main()
