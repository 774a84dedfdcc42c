"""A small CNN that reads a shapes-world image back into its attributes.

One head per attribute (shape, colour, pattern, background, position, size, count), trained on
renders of every concept (split "all": the new and rare ones included), augmented with blur, noise,
a trip through 32 px and back (the base model's resolution) and — when the base model's
autoencoder is given — its reconstructions, so that it reads the base model's (softer, upsampled)
samples as well as crisp renders.  Inputs of any size are resized to 64 px.  The 128-d penultimate features serve the
metrics as an image embedding (the world's CLIP-I / DINO).  Training: ``devtools/world/train_classifier.py``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .render import ATTRIBUTES

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
