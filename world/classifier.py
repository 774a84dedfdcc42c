"""A small CNN that reads a shapes-world image back into its attributes.

One head per attribute (shape, colour, pattern, background, position, size, count), trained on
renders of every concept (split "all": the new and rare ones included), augmented with blur, noise,
a trip through 32 px and back (the base model's resolution) and — when the base model's
autoencoder is given — its reconstructions, so that it reads the base model's (softer, upsampled)
samples as well as crisp renders.  Inputs of any size are resized to 64 px.  The 128-d penultimate features serve the
metrics as an image embedding (the world's CLIP-I / DINO).

    python -m likeness.world.classifier --out world/classifier.safetensors [--vae world/base_model/vae]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .render import ATTRIBUTES, Scene, render, sample_scene

HEADS = list(ATTRIBUTES)                        # shape, colour, pattern, background, position, size, count
CLASSIFIER_PATH = Path(__file__).resolve().parent / "classifier.safetensors"


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class WorldClassifier(nn.Module):
    """64×64 RGB in [0, 1] → logits per attribute; ``features`` is the 128-d embedding."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(_block(3, 24), _block(24, 48), _block(48, 96), _block(96, 96),
                                  nn.Flatten(), nn.Linear(96 * 16, 128), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in ATTRIBUTES.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> dict:
        f = self.body(x)
        return {k: h(f) for k, h in self.heads.items()}


def images_to_tensor(images) -> torch.Tensor:
    """PIL images / uint8 arrays / a float tensor in [0,1] → float NCHW in [0, 1], 64×64."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        x = x / 255.0 if x.max() > 1.5 else x
        if x.shape[-1] != 64:
            x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
        return x
    arrs = []
    for im in images:
        if hasattr(im, "convert"):
            im = im.convert("RGB")
        arrs.append(np.asarray(im, np.uint8))
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != 64:       # e.g. the base model's 32 px samples
        x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    return x


_CACHE: dict = {}


def load_classifier(path=None) -> WorldClassifier:
    """The shipped classifier (cached, eval mode, fp32)."""
    from safetensors.torch import load_file
    path = str(path or CLASSIFIER_PATH)
    if path not in _CACHE:
        m = WorldClassifier()
        m.load_state_dict({k: v.float() for k, v in load_file(path).items()})
        _CACHE[path] = m.eval()
    return _CACHE[path]


@torch.no_grad()
def predict(images, model=None, batch=256) -> list[dict]:
    """Attribute dicts (value names) for a list of images."""
    model = model or load_classifier()
    x = images_to_tensor(images)
    out = []
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        idx = {k: v.argmax(1).tolist() for k, v in logits.items()}
        for j in range(len(idx[HEADS[0]])):
            out.append({k: ATTRIBUTES[k][idx[k][j]] for k in HEADS})
    return out


@torch.no_grad()
def probabilities(images, model=None, batch=256) -> dict:
    """Softmax probabilities per attribute: {attr: tensor [n, n_values]}."""
    model = model or load_classifier()
    x = images_to_tensor(images)
    parts = [model(x[i:i + batch]) for i in range(0, len(x), batch)]
    return {k: torch.cat([p[k] for p in parts]).softmax(1) for k in HEADS}


@torch.no_grad()
def features(images, model=None, batch=256) -> torch.Tensor:
    model = model or load_classifier()
    x = images_to_tensor(images)
    return torch.cat([model.features(x[i:i + batch]) for i in range(0, len(x), batch)])


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
