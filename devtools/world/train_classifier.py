"""Train the shapes world's attribute classifier (``likeness.world.classifier``; the shipped
weights are world/classifier.safetensors): renders of every concept, augmented with blur, noise, a
trip through the base model's 32 px and back and, with ``--vae``, the base model's autoencoder
round trips, so it reads the base model's softer samples as well as crisp renders.

    python -m devtools.world.train_classifier --out world/classifier.safetensors [--vae world/base_model/vae]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from likeness.world.classifier import CLASSIFIER_PATH, HEADS, WorldClassifier, images_to_tensor
from likeness.world.render import ATTRIBUTES, Scene, render, sample_scene


def labels_of(scenes: list[Scene]) -> dict:
    return {k: torch.tensor([ATTRIBUTES[k].index(getattr(s, k)) for s in scenes]) for k in HEADS}


@torch.no_grad()
def accuracy(model, x, labels) -> dict:
    model.eval()
    logits = {k: torch.cat([model(x[i:i + 256])[k] for i in range(0, len(x), 256)]) for k in HEADS}
    return {k: float((logits[k].argmax(1) == labels[k]).float().mean()) for k in HEADS}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = len(x)
    # half the batch goes through the base model's resolution (32 px) and back up, as its samples do
    half = (torch.rand(n, 1, 1, 1, generator=g) < 0.5).float()
    x = half * _down_up(x) + (1 - half) * x
    # random blur (a 3×3 box mixed in with a random weight) + noise + small brightness jitter
    w = torch.rand(n, 1, 1, 1, generator=g) * 0.8
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = (1 - w) * x + w * blurred
    x = x * (1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5))
    x = x + torch.randn(x.shape, generator=g) * 0.03 * torch.rand(n, 1, 1, 1, generator=g)
    return x.clamp(0, 1)


def _down_up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)


def _vae_roundtrip(vae, x01: torch.Tensor, batch=128) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, len(x01), batch):
            xi = x01[i:i + batch] * 2 - 1
            if vae.config.sample_size < xi.shape[-1]:
                xi = F.avg_pool2d(xi, xi.shape[-1] // vae.config.sample_size)
            z = vae.encode(xi).latent_dist.mean
            y = ((vae.decode(z).sample + 1) / 2).clamp(0, 1)
            outs.append(F.interpolate(y, size=x01.shape[-2:], mode="bilinear", align_corners=False))
    return torch.cat(outs)


def train(out: Path, n_train=12000, n_test=2000, epochs=4, batch=64, lr=3e-3, seed=0, vae_dir=None, p_vae=0.5,
          init=None):
    torch.manual_seed(seed)
    t0 = time.time()
    rng = np.random.default_rng(seed + 100)
    tr_scenes = [sample_scene(rng, "all") for _ in range(n_train)]
    rng_te = np.random.default_rng(seed + 101)
    te_scenes = [sample_scene(rng_te, "all") for _ in range(n_test)]
    xtr = images_to_tensor([render(s) for s in tr_scenes])
    xte = images_to_tensor([render(s) for s in te_scenes])
    print(f"rendered {n_train}+{n_test} in {time.time() - t0:.0f}s", flush=True)
    ytr, yte = labels_of(tr_scenes), labels_of(te_scenes)
    xtr_vae = xte_vae = None
    if vae_dir:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval()
        k = int(n_train * p_vae)
        xtr_vae = _vae_roundtrip(vae, xtr[:k])
        xtr = torch.cat([xtr_vae, xtr[k:]])
        xte_vae = _vae_roundtrip(vae, xte)
        print(f"VAE round trip of {k} train + {n_test} test images ({time.time() - t0:.0f}s)", flush=True)
    model = WorldClassifier()
    if init:
        from safetensors.torch import load_file
        model.load_state_dict({k: v.float() for k, v in load_file(str(init)).items()})
        print(f"continuing from {init}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (n_train // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed + 102)
    step = 0
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=g)
        for i in range(0, n_train - batch + 1, batch):
            idx = perm[i:i + batch]
            logits = model(_augment(xtr[idx], g))
            loss = sum(F.cross_entropy(logits[k], ytr[k][idx], label_smoothing=0.05) for k in HEADS)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        acc = accuracy(model, xte, yte)
        print(f"epoch {ep} loss {loss.item():.3f} held-out {json.dumps({k: round(v, 4) for k, v in acc.items()})} "
              f"({time.time() - t0:.0f}s)", flush=True)
    report = {"held_out_renders": accuracy(model, xte, yte)}
    if xte_vae is not None:
        report["held_out_vae_roundtrip"] = accuracy(model, xte_vae, yte)
    from safetensors.torch import save_file
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(out),
              metadata={"heads": json.dumps(ATTRIBUTES), "seed": str(seed), "n_train": str(n_train),
                        "epochs": str(epochs), "vae": str(vae_dir or "")})
    report["time_s"] = round(time.time() - t0)
    print(json.dumps(report, indent=1), flush=True)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=CLASSIFIER_PATH)
    p.add_argument("--vae", default=None, help="an AutoencoderKL folder whose round trips join the training set")
    p.add_argument("--n-train", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--init", default=None, help="continue from these weights")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train(a.out, n_train=a.n_train, epochs=a.epochs, seed=a.seed, vae_dir=a.vae, lr=a.lr, init=a.init)


if __name__ == "__main__":
    main()
