"""The shapes world's counterparts of the personalization papers' metrics, read by the classifier.

* ``concept_fidelity``  — fraction of images in which the classifier sees the concept (e.g.
  shape == "moon"); the world's "does it look like the subject".
* ``feature_similarity`` — mean cosine between classifier embeddings of the images and of the
  reference images (the world's CLIP-I / DINO score).
* ``prompt_fidelity``   — mean fraction of the *other* attributes a prompt states that the
  classifier finds in the image (the world's CLIP-T).
* ``diversity``         — mean pairwise cosine distance between the images' embeddings.
* ``attribute_accuracy`` — per attribute, how often the classifier agrees with what the prompts say.

Images are PIL images, uint8 arrays or float tensors in [0, 1] (N×3×64×64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import classifier as C
from .render import ATTRIBUTES, NEW_CONCEPTS, RARE_CONCEPT, parse_caption


def concept_attribute(concept: str) -> str:
    """Which attribute a concept value belongs to ("moon" → "shape", "checked" → "pattern")."""
    if concept in NEW_CONCEPTS:
        return NEW_CONCEPTS[concept]
    if concept == RARE_CONCEPT[1]:
        return RARE_CONCEPT[0]
    hits = [k for k, v in ATTRIBUTES.items() if concept in v]
    if not hits:
        raise ValueError(f"unknown concept {concept!r}")
    return hits[0]


def embed(images, model=None) -> torch.Tensor:
    """L2-normalised classifier embeddings (the pre-activation 128-d penultimate layer)."""
    model = model or C.load_classifier()
    x = C.images_to_tensor(images)
    with torch.no_grad():
        f = torch.cat([model.body[:-1](x[i:i + 256]) for i in range(0, len(x), 256)])
    return F.normalize(f, dim=1)


def concept_fidelity(images, concept: str, model=None) -> float:
    attr = concept_attribute(concept)
    preds = C.predict(images, model)
    return sum(p[attr] == concept for p in preds) / max(1, len(preds))


def concept_probability(images, concept: str, model=None) -> float:
    """Mean classifier probability of the concept (a smoother fidelity)."""
    attr = concept_attribute(concept)
    probs = C.probabilities(images, model)[attr]
    return float(probs[:, ATTRIBUTES[attr].index(concept)].mean())


def feature_similarity(images, references, model=None) -> float:
    a, b = embed(images, model), embed(references, model)
    return float((a @ b.T).mean())


def prompt_fidelity(images, prompts, concept: str | None = None, model=None) -> float:
    """Mean over images of the fraction of the prompt's stated attributes (other than the
    concept's) that the classifier finds.  ``prompts``: one string for all, or one per image."""
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    skip = concept_attribute(concept) if concept else None
    preds = C.predict(images, model)
    scores = []
    for p, text in zip(preds, prompts):
        stated = {k: v for k, v in parse_caption(text).items() if k != skip}
        if stated:
            scores.append(sum(p[k] == v for k, v in stated.items()) / len(stated))
    return sum(scores) / max(1, len(scores))


def attribute_accuracy(images, prompts, model=None) -> dict:
    """{attribute: fraction of images whose classified value equals the one the prompt states}."""
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    preds = C.predict(images, model)
    hit: dict = {}
    tot: dict = {}
    for p, text in zip(preds, prompts):
        for k, v in parse_caption(text).items():
            tot[k] = tot.get(k, 0) + 1
            hit[k] = hit.get(k, 0) + int(p[k] == v)
    return {k: hit[k] / tot[k] for k in ATTRIBUTES if k in tot}


def diversity(images, model=None) -> float:
    f = embed(images, model)
    n = len(f)
    if n < 2:
        return 0.0
    sim = f @ f.T
    return float((1 - sim)[~torch.eye(n, dtype=torch.bool)].mean())


def report(images, concept: str, prompts, references=None, model=None) -> dict:
    """All metrics in one dict (what the quality benchmark writes per method)."""
    out = {
        "concept_fidelity": concept_fidelity(images, concept, model),
        "concept_probability": concept_probability(images, concept, model),
        "prompt_fidelity": prompt_fidelity(images, prompts, concept, model),
        "diversity": diversity(images, model),
    }
    if references is not None:
        out["feature_similarity"] = feature_similarity(images, references, model)
    return out


def merge_block(path, block: str, start: str, end: str, heading: str) -> None:
    """Put ``block`` (which begins with ``start`` and ends with ``end``) into the markdown file
    ``path``: in place of the previous block between those markers, else appended under
    ``heading``; so a rerun replaces its own table and nothing else."""
    from pathlib import Path

    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    i, j = text.find(start), text.find(end)
    if i >= 0 and j >= 0:
        text = text[:i] + block + text[j + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n" + block + "\n"
    path.write_text(text)
