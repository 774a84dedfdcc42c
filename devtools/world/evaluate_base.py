"""How well the base model draws what it is asked, read by the world classifier.

    python -m devtools.world.evaluate_base [--model world/base_model] [--n 256] [--grid out.png]

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

from likeness.world import metrics
from likeness.world.model import RESOLUTION
from likeness.world.render import caption, grid, sample_scene, render


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
        # the model's own resolution (32 px, 8×8 latents): at 64 px the UNet would denoise 16×16
        # latents it never saw in training (the first evaluations did, and read shapes at chance)
        images += pipe(prompts[i:i + batch], height=RESOLUTION, width=RESOLUTION, num_inference_steps=steps,
                       guidance_scale=guidance, generator=g).images
    return images


MARK_START = "<!-- likeness-world-base:start -->"
MARK_END = "<!-- likeness-world-base:end -->"
CHANCE = {"shape": 1 / 5, "colour": 1 / 6, "pattern": 1 / 3, "background": 1 / 5, "position": 1 / 9,
          "size": 0.5, "count": 0.5}


@torch.no_grad()
def ceilings(prompts) -> dict:
    """Per-attribute accuracy of the classifier on the prompts' own renders, at 32 px and through
    the base model's autoencoder: what a perfect denoiser could score with this VAE."""
    from diffusers import AutoencoderKL
    from likeness.world.model import BASE_MODEL_DIR
    from likeness.world.render import Scene, parse_caption
    scenes = [Scene(**parse_caption(t)) for t in prompts]
    x = torch.from_numpy(np.stack([np.asarray(render(s), np.float32) / 255 for s in scenes])).permute(0, 3, 1, 2)
    x32 = torch.nn.functional.avg_pool2d(x, x.shape[-1] // RESOLUTION)
    vae = AutoencoderKL.from_pretrained(BASE_MODEL_DIR / "vae", torch_dtype=torch.float32).eval()
    rt = torch.cat([((vae.decode(vae.encode(x32[i:i + 64] * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
                    for i in range(0, len(x32), 64)])
    rt = (rt * 255).round() / 255                      # as the pipeline's uint8 images
    return {"renders_32px": metrics.attribute_accuracy(x32, prompts),
            "vae_round_trip": metrics.attribute_accuracy(rt, prompts)}


def markdown(res: dict, command: str) -> str:
    acc, ceil = res["per_attribute_accuracy"], res.get("ceilings", {})
    lines = [MARK_START, "", f"Command: `{command}` ({res['n']} held-out prompts of common concepts, "
             f"DDIM {res['steps']} steps, guidance {res['guidance']}, seed {res['seed']}, {res['time_s']:.0f} s).", "",
             "| attribute | chance | **base model samples** | VAE round trip of the prompts' renders | renders (32 px) |",
             "|---|---|---|---|---|"]
    for k in acc:
        rt = ceil.get("vae_round_trip", {}).get(k)
        rd = ceil.get("renders_32px", {}).get(k)
        lines.append(f"| {k} | {CHANCE.get(k, 0):.2f} | **{acc[k]:.2f}** | "
                     f"{'—' if rt is None else f'{rt:.2f}'} | {'—' if rd is None else f'{rd:.2f}'} |")
    lines += [f"| prompt fidelity (mean per image) | | **{res['prompt_fidelity']:.2f}** | | |",
              f"| every stated attribute right | | **{res['all_attributes_right']:.2f}** | | |",
              f"| diversity | | {res['diversity']:.2f} | | |", "", MARK_END]
    return "\n".join(lines)


def write_markdown(path, res: dict, command: str) -> None:
    metrics.merge_block(path, markdown(res, command), MARK_START, MARK_END,
                        "World base model: per-attribute accuracy (issue 5)")


def main(argv=None):
    from likeness.world.model import BASE_MODEL_DIR, load_pipeline
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(BASE_MODEL_DIR))
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="write the first 32 samples (each row of renders above its samples) here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", default=None, help="write the per-attribute table into this file (BENCHMARKS.md)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    pipe = load_pipeline(a.model)
    prompts = common_prompts(a.n)
    images = generate(pipe, prompts, a.seed, a.steps, a.guidance)
    acc = metrics.attribute_accuracy(images, prompts)
    pf = metrics.prompt_fidelity(images, prompts)
    from likeness.world.classifier import predict
    from likeness.world.render import parse_caption
    preds = predict(images)
    all_ok = float(np.mean([all(p[k] == v for k, v in parse_caption(t).items()) for p, t in zip(preds, prompts)]))
    res = {"n": a.n, "steps": a.steps, "guidance": a.guidance, "seed": a.seed,
           "per_attribute_accuracy": {k: round(v, 4) for k, v in acc.items()},
           "prompt_fidelity": round(pf, 4), "all_attributes_right": round(all_ok, 4),
           "diversity": round(metrics.diversity(images), 4), "time_s": round(time.time() - t0, 1)}
    res["ceilings"] = {k: {a_: round(v, 4) for a_, v in d.items()} for k, d in ceilings(prompts).items()}
    print(json.dumps(res, indent=1))
    if a.markdown:
        cmd = "python -m devtools.world.evaluate_base" + (f" --n {a.n}" if a.n != 256 else "") + \
              (f" --threads {a.threads}" if a.threads != 1 else "") + f" --markdown {Path(a.markdown).name}"
        write_markdown(a.markdown, res, cmd)
    if a.grid:
        from likeness.world.render import Scene
        refs = []
        for t in prompts[:32]:
            d = parse_caption(t)
            refs.append(render(Scene(**d)))
        big = [im.resize(refs[0].size, 0) for im in images[:32]]
        rows = []
        for r in range(4):
            rows += refs[r * 8:(r + 1) * 8] + big[r * 8:(r + 1) * 8]
        grid(rows, cols=8).resize((8 * 128, 8 * 128), 0).save(a.grid)
        Path(a.grid).with_suffix(".txt").write_text("\n".join(prompts[:32]) + "\n")
    return res


if __name__ == "__main__":
    main()
